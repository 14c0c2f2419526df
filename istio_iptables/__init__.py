"""istio-iptables: Istio's sidecar traffic capture, reimplemented in Python."""
