"""The expected failures, each with its exit code; none of them prints a traceback."""

from __future__ import annotations


class IstioIptablesError(Exception):
    exit_code = 1


class ConfigError(IstioIptablesError):
    """Bad input: a flag, environment variable or host file holds a value we refuse. Nothing was changed."""

    exit_code = 2


class HostError(IstioIptablesError):
    """The host could not tell us something the plan needs (no usable address, unreadable resolv.conf)."""

    exit_code = 1


class ApplyError(IstioIptablesError):
    """A binary or the kernel refused; the message names the failing command and its stderr."""

    exit_code = 1


class ValidationProbeError(IstioIptablesError):
    """The ``--run-validation`` probe saw no redirected connection in time (Istio's exit code)."""

    exit_code = 126
