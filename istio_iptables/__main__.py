from istio_iptables.cli.console import main

main()
