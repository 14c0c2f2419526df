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
from collections.abc import Mapping

from . import config as configuration
from . import interrupts, netns
from .errors import PROG, ConfigError, IstioIptablesError
from .hostfacts import HostFacts, gather
from .logsetup import Log, configure
from .model import Plan
from .plan import build_plan, proxy_identity, usable_ipv6
from .records import replace

log = Log(__name__)
CLEAN_PROG = "istio-clean-iptables"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: expected failures, SIGINT and SIGTERM included, end with one line on stderr and
    their exit code."""
    _command(PROG, without_leading_word(sys.argv[1:] if argv is None else argv))


def clean_main(argv: list[str] | None = None) -> None:
    """``istio-clean-iptables``, as Istio 1.5 shipped it: the same flags, clean-up only."""
    _command(CLEAN_PROG, sys.argv[1:] if argv is None else argv)


def _command(prog: str, argv: list[str]) -> None:
    clean = prog == CLEAN_PROG
    interrupts.start()
    try:
        arguments = go_switches(argv)
        # A shell asking for completions runs the command with no arguments and a variable naming the
        # shell: Typer answers it, the plain run (an apply!) must not.
        completing = f"_{prog}_COMPLETE".replace("-", "_").upper() in os.environ
        given = None if completing else plain_run(arguments, _CLEAN_OPTIONS if clean else _OPTIONS)
        if given is None:
            from .app import main as typer_main  # noqa: PLC0415

            code = typer_main(arguments, clean)
        else:
            run(configured({**given, "cleanup_only": True} if clean else given))
            code = 0
        interrupts.finish()
    except IstioIptablesError as error:
        interrupts.finish()
        print(f"{prog}: {error}", file=sys.stderr)
        code = error.exit_code
    sys.exit(code)


def without_leading_word(arguments: list[str]) -> list[str]:
    """Istio's injector writes ``istio-iptables`` as the first argument, for its image runs ``pilot-agent``,
    whose subcommand that is; this image runs us directly, so the word is dropped and the rest runs as is."""
    return arguments[1:] if arguments[:1] == [PROG] else arguments


def plain_run(
    arguments: list[str], options: Mapping[str, configuration.Setting] | None = None
) -> dict[str, str | bool | None] | None:
    """The options of a command line made only of ``--flag VALUE``, ``--flag=VALUE``, ``-f VALUE`` and
    switches (``--switch``, ``--no-switch``, ``-n``) of ``options`` (default: the main command's), as Typer
    would pass them to the command; None for anything else (help, a subcommand, ``--``, bundled short
    flags, a value that looks like a flag, an unknown flag), which Typer then parses, runs or words the
    usage error for."""
    options = _OPTIONS if options is None else options
    given: dict[str, str | bool | None] = {setting.key: None for setting in options.values()}
    remaining = iter(arguments)
    for argument in remaining:
        name, equals, value = argument.partition("=") if argument.startswith("--") else (argument, "", "")
        setting = options.get(name)
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
_CLEAN_OPTIONS = {name: setting for name, setting in _OPTIONS.items() if setting.key != "cleanup_only"}
"""``istio-clean-iptables``'s: the same without ``--cleanup-only``, which it always is."""


def configured(given: configuration.Given) -> configuration.Config:
    """The Config of the given options and the environment, with logging set up as it asks."""
    config = configuration.load(given, os.environ)
    configure(config.log)
    return config


def run(config: configuration.Config) -> None:
    if config.dry_run:
        facts, plan = enter(config, changes_system=False)
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
        if config.cleanup_only and config.ipv6 is None:
            # A clean-up removes ours from every family it finds them in: it needs no IPv6 detection (which
            # fails in a namespace with only loopback), and a plan with both families routes both.
            config = replace(config, ipv6=True)
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
    elif changes_system and not config.allow_host_namespace and "KUBERNETES_SERVICE_HOST" not in os.environ:
        # Kubernetes sets KUBERNETES_SERVICE_HOST in every container, the init container included.
        doubt = netns.host_namespace_doubt()
        if doubt:
            raise ConfigError(
                f"refusing to change the network here outside Kubernetes: {doubt}; pass --network-namespace "
                "NAME, or --allow-host-namespace if this namespace is the workload's"
            )
    return planned(config)


def planned(config: configuration.Config) -> tuple[HostFacts, Plan]:
    """The host facts read here and the plan built from them, saying what they mean for IPv6."""
    facts = gather(config)
    plan = build_plan(config, facts)
    addresses = ", ".join(map(str, usable_ipv6(facts.addresses)))
    if addresses and config.ipv6 is None:
        log.info("IPv6 captured as well as IPv4: this namespace has IPv6 addresses (%s)", addresses)
    elif addresses and config.native_nftables:
        log.warning(
            "--no-ipv6: the inet tables still capture the IPv6 traffic of %s, but without the IPv6-only rules "
            "(as Istio's nftables do)",
            addresses,
        )
    elif addresses:
        log.warning("--no-ipv6: the IPv6 traffic of %s escapes the proxy (no IPv6 rules)", addresses)
    return facts, plan


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
