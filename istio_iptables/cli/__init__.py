"""The CLI: the console entry points (``console``), the fast argv path (``fast``), the Typer application
(``app``) and the run both paths share (``command``). Empty, so that the CNI plugin's entry point, which lives
here too, loads none of the CLI's modules."""
