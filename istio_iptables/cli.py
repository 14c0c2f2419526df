"""The ``istio-iptables`` command: wires flags to Config, Config and host facts to a Plan, the Plan to output.

Start-up time is a feature: an init container runs this on every pod's start-up path. A plain run (flags
only, the init container's case) is parsed here from ``config.SETTINGS`` without importing Typer, which
alone costs more than Istio's whole detection sequence; everything else (``--help``, subcommands, any
argument whose meaning is less than obvious) goes to the Typer application in ``app.py``, which parses the
same table the same way (tests hold the two equal). Each path imports only what it needs: a dry run never
loads the backends and an apply never loads the renderers it does not use.
"""

from __future__ import annotations

import os
import sys

from . import config as configuration
from . import netns
from .errors import ConfigError, IstioIptablesError
from .hostfacts import HostFacts, gather
from .logsetup import configure
from .model import Plan
from .plan import build_plan, proxy_identity

PROG = "istio-iptables"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: expected failures end with one line on stderr and their exit code."""
    try:
        arguments = go_switches(without_leading_word(sys.argv[1:] if argv is None else argv))
        given = plain_run(arguments)
        if given is None:
            from .app import main as typer_main  # noqa: PLC0415

            code = typer_main(arguments)
        else:
            run(configured(given))
            code = 0
    except IstioIptablesError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    sys.exit(code)


def without_leading_word(arguments: list[str]) -> list[str]:
    """Istio's injector writes ``istio-iptables`` as the first argument, for its image runs ``pilot-agent``,
    whose subcommand that is; this image runs us directly, so the word is dropped and the rest runs as is."""
    return arguments[1:] if arguments[:1] == [PROG] else arguments


def plain_run(arguments: list[str]) -> dict[str, str | bool | None] | None:
    """The options of a command line made only of ``--flag VALUE``, ``--flag=VALUE``, ``-f VALUE`` and
    switches (``--switch``, ``--no-switch``, ``-n``), as Typer would pass them to the main command; None
    for anything else (help, a subcommand, ``--``, bundled short flags, a value that looks like a flag, an
    unknown flag), which Typer then parses, runs or words the usage error for."""
    given: dict[str, str | bool | None] = {setting.key: None for setting in configuration.SETTINGS if setting.flags}
    remaining = iter(arguments)
    for argument in remaining:
        name, equals, value = argument.partition("=") if argument.startswith("--") else (argument, "", "")
        setting = _OPTIONS.get(name)
        if setting is None or (setting.switch and equals):
            return None
        if setting.switch:
            given[setting.key] = name != setting.off
            continue
        if not equals:
            following = next(remaining, None)
            if following is None or (following.startswith("-") and following != "-"):
                return None
            value = following
        given[setting.key] = value
    return given


_OPTIONS = {
    name: setting
    for setting in configuration.SETTINGS
    for name in (*setting.flags, *((setting.off,) if setting.switch else ()))
}
"""Every option name of the main command, switches' ``--no-`` forms included."""


def configured(given: configuration.Given) -> configuration.Config:
    """The Config of the given options and the environment, with logging set up as it asks."""
    config = configuration.load(given, os.environ)
    configure(config.log)
    return config


def run(config: configuration.Config) -> None:
    if config.dry_run:
        facts = gather(config)
        plan = build_plan(config, facts)
        if config.dry_run_file_path:
            from .render.dryrun import istio_command_log  # noqa: PLC0415

            try:
                with open(config.dry_run_file_path, "w", encoding="utf-8") as file:
                    file.write(istio_command_log(plan))
            except OSError as error:
                raise ConfigError(
                    f"invalid value for DRY_RUN_FILE_PATH: '{config.dry_run_file_path}': {error.strerror}"
                ) from None
        sys.stdout.write(_dry_run_text(config, plan))
    else:
        facts, plan = enter(config, changes_system=not config.skip_rule_apply)
        if not config.skip_rule_apply:
            from .apply import apply, apply_native  # noqa: PLC0415

            (apply_native if config.native_nftables else apply)(config, plan)
    if config.run_validation:
        from .validate import validate  # noqa: PLC0415

        validate(config, plan.families, *proxy_identity(config, facts))


def _dry_run_text(config: configuration.Config, plan: Plan) -> str:
    if config.native_nftables:
        from .render.nft import render_nft  # noqa: PLC0415

        return render_nft(plan)
    from .render.dryrun import cleanup_output, dry_run_output  # noqa: PLC0415

    return cleanup_output(plan) if config.cleanup_only else dry_run_output(plan, config.dry_run_format)


def enter(config: configuration.Config, changes_system: bool) -> tuple[HostFacts, Plan]:
    """Move into the namespace to work in (refusing the host's own when about to change it), then read the
    host facts there and build the plan."""
    if config.network_namespace:
        netns.enter(config.network_namespace)
    elif changes_system and not config.allow_host_namespace and _looks_like_a_host():
        raise ConfigError(
            "refusing to change the network of PID 1's namespace outside Kubernetes (this looks like the host, "
            "not a pod): pass --network-namespace NAME, or --allow-host-namespace if this host is the workload"
        )
    facts = gather(config)
    return facts, build_plan(config, facts)


def go_switches(argv: list[str]) -> list[str]:
    """Istio's flag library takes ``--dry-run=true`` and ``--redirect-dns=false``; Click takes the bare flag
    or its ``--no-`` form. Translate, so an Istio command line works as it is."""
    switches = {setting.flags[0]: setting for setting in configuration.SETTINGS if setting.switch}
    translated = []
    for argument in argv:
        name, equals, value = argument.partition("=")
        setting = switches.get(name) if equals else None
        if setting is None:
            translated.append(argument)
            continue
        try:
            translated.append(name if configuration.parse_go_bool(value) else setting.off)
        except ValueError:
            raise ConfigError(
                f"invalid value for {setting.label}: '{configuration.shown(value)}': not a boolean (true or false)"
            ) from None
    return translated


def clean_main() -> None:
    """``istio-clean-iptables``, as Istio 1.5 shipped it: the same flags, clean-up only."""
    main([*sys.argv[1:], "--cleanup-only"])


def _looks_like_a_host() -> bool:
    # Kubernetes sets KUBERNETES_SERVICE_HOST in every container, the init container included.
    return "KUBERNETES_SERVICE_HOST" not in os.environ and netns.may_be_pid1_namespace()
