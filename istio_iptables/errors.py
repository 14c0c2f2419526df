"""The expected failures, each with its exit code; none of them prints a traceback."""

from __future__ import annotations

PROG = "istio-iptables"
"""The name every error line starts with."""


class IstioIptablesError(Exception):
    exit_code = 1


class ConfigError(IstioIptablesError):
    """Bad input: a flag, environment variable or host file holds a value we refuse. Nothing was changed."""

    exit_code = 2


class HostError(IstioIptablesError):
    """The host could not tell us something the plan needs (no usable address, unreadable resolv.conf)."""

    exit_code = 1


class NoAddressError(HostError):
    """The namespace has no usable address to tell whether to capture IPv6 (each face words its remedy)."""


class ApplyError(IstioIptablesError):
    """A binary or the kernel refused; the message names the failing command and its stderr."""

    exit_code = 1


class MissingExtraError(IstioIptablesError):
    """A command needs Python packages the plain install does not carry: the message names the extra that
    brings them. Raised before anything is changed."""

    exit_code = 2

    def __init__(self, command: str, extra: str) -> None:
        super().__init__(f"{command} needs the {extra} extra: pip install 'istio-iptables[{extra}]'")


class ValidationProbeError(IstioIptablesError):
    """The ``--run-validation`` probe saw no redirected connection in time (Istio's exit code)."""

    exit_code = 126


class StoppedBySignalError(IstioIptablesError):
    """SIGINT or SIGTERM stopped the run; exit 128 + the signal's number (130, 143), as a shell reports it."""

    def __init__(self, signal_name: str, number: int, detail: str) -> None:
        super().__init__(f"stopped by {signal_name}: {detail}")
        self.exit_code = 128 + number
