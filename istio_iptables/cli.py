"""The ``istio-iptables`` command: wires flags to Config, Config and host facts to a Plan, the Plan to output.

The options are generated from ``config.SETTINGS`` so the flag table exists once. Every option arrives as
text (or a switch) and ``config.load`` parses it, which gives every bad value the same one-line error.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from typing import Any, Optional

import typer

from . import config as configuration
from . import netns
from .apply import apply
from .errors import ApplyError, ConfigError, IstioIptablesError
from .hostfacts import HostFacts, gather
from .logsetup import configure
from .model import Plan
from .plan import build_plan, proxy_identity
from .preflight import preflight, render_preflight_json, render_preflight_text
from .render.dryrun import cleanup_output, dry_run_output, istio_command_log
from .render.nft import render_nft
from .status import render_status_json, render_status_text, status
from .validate import validate

PROG = "istio-iptables"
log = logging.getLogger(__name__)

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},
    help="Make every TCP connection of a pod, and optionally its DNS, go through the sidecar proxy: "
    "the rules of Istio's istio-iptables for the same flags, printed (--dry-run) or applied.",
    epilog="Environment only: "
    + "; ".join(
        f"{setting.envvars[0]} ({setting.help.rstrip('.')}; default: {setting.default or '(empty)'})"
        for setting in configuration.SETTINGS
        if not setting.flags
    )
    + ". Exit codes: 0 success, 1 apply or host failure, 2 bad input, 126 validation failed.",
)


def _help(setting: configuration.Setting) -> str:
    env = f" [env: {', '.join(setting.envvars)}]" if setting.envvars else ""
    default = f" [default: {setting.default or '(empty)'}]"
    return setting.help + env + default


def _option(setting: configuration.Setting) -> inspect.Parameter:
    names = [f"{setting.flags[0]}/{setting.off}", *setting.flags[1:]] if setting.switch else setting.flags
    return inspect.Parameter(
        setting.key,
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(
            None,
            *names,
            help=_help(setting),
            show_default=False,
            metavar=None if setting.switch else setting.metavar,
        ),
        annotation=Optional[bool] if setting.switch else Optional[str],  # noqa: UP045 (Typer reads it)
    )


def capture(ctx: typer.Context, **given: Any) -> None:
    config = configuration.load(given, os.environ)
    configure(config.log)
    ctx.obj = config
    if ctx.invoked_subcommand is None:
        run(config)


capture.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        *(_option(setting) for setting in configuration.SETTINGS if setting.flags),
    ]
)
app.callback(invoke_without_command=True)(capture)


def run(config: configuration.Config) -> None:
    if config.dry_run:
        facts = gather(config)
        plan = build_plan(config, facts)
        if config.dry_run_file_path:
            try:
                with open(config.dry_run_file_path, "w", encoding="utf-8") as file:
                    file.write(istio_command_log(plan))
            except OSError as error:
                raise ConfigError(
                    f"invalid value for DRY_RUN_FILE_PATH: '{config.dry_run_file_path}': {error.strerror}"
                ) from None
        if config.native_nftables:
            sys.stdout.write(render_nft(plan))
        else:
            sys.stdout.write(
                cleanup_output(plan) if config.cleanup_only else dry_run_output(plan, config.dry_run_format)
            )
    else:
        facts, plan = _enter(config, changes_system=not config.skip_rule_apply)
        if config.native_nftables and not config.skip_rule_apply:
            raise ApplyError("--native-nftables: the native nftables backend is not part of this build yet")
        if not config.skip_rule_apply:
            apply(config, plan)
    if config.run_validation:
        validate(config, plan.families, *proxy_identity(config, facts))


def _enter(config: configuration.Config, changes_system: bool) -> tuple[HostFacts, Plan]:
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


def _output_format(value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(
            f"invalid value for --format: '{configuration.shown(value)}': must be one of: {', '.join(choices)}"
        )
    return value


@app.command("preflight")
def preflight_command(
    ctx: typer.Context,
    output: str = typer.Option("text", "--format", help="text or json.", metavar="text|json"),
) -> None:
    """Say what an apply would do here and whether it can, changing nothing: exit 0 if it would succeed."""
    config: configuration.Config = ctx.obj
    output = _output_format(output, ("text", "json"))
    _, plan = _enter(config, changes_system=False)
    report = preflight(config, plan)
    sys.stdout.write(render_preflight_json(report) if output == "json" else render_preflight_text(report))
    raise typer.Exit(0 if report.ok else 1)


@app.command("status")
def status_command(
    ctx: typer.Context,
    output: str = typer.Option("text", "--format", help="text or json.", metavar="text|json"),
) -> None:
    """Compare the namespace's live rules with the plan of the given flags: exit 0 in sync, 1 on drift."""
    config: configuration.Config = ctx.obj
    output = _output_format(output, ("text", "json"))
    _, plan = _enter(config, changes_system=False)
    report = status(config, plan)
    sys.stdout.write(render_status_json(report) if output == "json" else render_status_text(report))
    raise typer.Exit(0 if report.in_sync else 1)


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


def main(argv: list[str] | None = None) -> None:
    """Console entry point: expected failures end with one line on stderr and their exit code."""
    command = typer.main.get_command(app)
    try:
        arguments = go_switches(sys.argv[1:] if argv is None else argv)
        code = command.main(args=arguments, prog_name=PROG, standalone_mode=False)
    except IstioIptablesError as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except Exception as error:
        # Typer's own usage errors (unknown flag, missing value); its exception classes are not public.
        if not (hasattr(error, "format_message") and hasattr(error, "exit_code")):
            raise
        print(f"{PROG}: {error.format_message()}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


def clean_main() -> None:
    """``istio-clean-iptables``, as Istio 1.5 shipped it: the same flags, clean-up only."""
    main([*sys.argv[1:], "--cleanup-only"])


def _looks_like_a_host() -> bool:
    # Kubernetes sets KUBERNETES_SERVICE_HOST in every container, the init container included.
    return "KUBERNETES_SERVICE_HOST" not in os.environ and netns.may_be_pid1_namespace()
