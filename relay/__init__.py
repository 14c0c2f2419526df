"""A mesh-less transparent proxy: the sidecar that the ``relay`` injection template runs.

It accepts the connections the capture redirects to it, connects to each one's original destination, copies
bytes both ways and logs one JSON line per connection (source, destination, bytes each way). Outside the
``istio_iptables`` package: it is a separate program with an image of its own (Dockerfile.proxy), and shares
no code with the capture.
"""
