"""A run of the main command, once its options are read, which both CLI paths share: the Config, then a dry
run's output, an apply or a clean-up, and the validation probe."""

from __future__ import annotations

import os
import sys

from istio_iptables.capture import config as configuration
from istio_iptables.capture.model import Plan
from istio_iptables.capture.plan import proxy_identity
from istio_iptables.errors import ConfigError
from istio_iptables.host.hostfacts import enter
from istio_iptables.log import configure
from istio_iptables.records import replace

CLEAN_PROG = "istio-clean-iptables"


def configured(given: configuration.Given) -> configuration.Config:
    """The Config of the given options and the environment, with logging set up as it asks."""
    config = configuration.load(given, os.environ)
    configure(config.log)
    return config


def run(config: configuration.Config) -> None:
    if config.dry_run:
        facts, plan = enter(config, changes_system=False)
        if config.dry_run_file_path:
            from istio_iptables.cli.dryrun import istio_command_log  # noqa: PLC0415

            try:
                with open(config.dry_run_file_path, "w", encoding="utf-8") as file:
                    file.write(istio_command_log(plan))
            except OSError as error:
                raise ConfigError(
                    f"invalid value for DRY_RUN_FILE_PATH: '{config.dry_run_file_path}': {error.strerror}"
                ) from None
        sys.stdout.write(_dry_run_text(config, plan))
    else:
        if config.cleanup_only and config.ipv6 is None:
            # A clean-up removes ours from every family it finds them in: it needs no IPv6 detection (which
            # fails in a namespace with only loopback), and a plan with both families routes both.
            config = replace(config, ipv6=True)
        facts, plan = enter(config, changes_system=not config.skip_rule_apply)
        if not config.skip_rule_apply:
            from istio_iptables.apply import apply, apply_native  # noqa: PLC0415

            (apply_native if config.native_nftables else apply)(config, plan)
    if config.run_validation:
        from istio_iptables.host.validate import validate  # noqa: PLC0415

        validate(config, plan.families, *proxy_identity(config, facts))


def _dry_run_text(config: configuration.Config, plan: Plan) -> str:
    if config.native_nftables:
        from istio_iptables.render.nft import render_nft  # noqa: PLC0415

        return render_nft(plan)
    from istio_iptables.cli.dryrun import cleanup_output, dry_run_output  # noqa: PLC0415

    return cleanup_output(plan) if config.cleanup_only else dry_run_output(plan, config.dry_run_format)
