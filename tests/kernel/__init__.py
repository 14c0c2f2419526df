"""Kernel tests: real iptables rules and real traffic inside network namespaces that each test creates."""
