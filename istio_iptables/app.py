"""The Typer application: ``--help``, the subcommands, and every command line the fast path of ``cli.main``
leaves to it. Importing Typer costs more than Istio's whole detection sequence, so a plain run never loads
this module.

The options are generated from ``config.SETTINGS`` so the flag table exists once. Every option arrives as
text (or a switch) and ``config.load`` parses it, which gives every bad value the same one-line error.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional, TypeVar

import typer

from . import cli
from . import config as configuration
from .errors import ConfigError
from .hostfacts import gather
from .model import AddressSet, CtState, Family, GidOwner, Plan, PortSet, Proto
from .plan import build_plan

T = TypeVar("T")

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
    ctx.obj = cli.configured(given)
    if ctx.invoked_subcommand is None:
        cli.run(ctx.obj)


capture.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        *(_option(setting) for setting in configuration.SETTINGS if setting.flags),
    ]
)
app.callback(invoke_without_command=True)(capture)


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

    def examine(config: configuration.Config, plan: Plan) -> tuple[bool, str, str]:
        from .preflight import preflight, render_preflight_json, render_preflight_text  # noqa: PLC0415

        report = preflight(config, plan)
        return report.ok, render_preflight_text(report), render_preflight_json(report)

    _answer(ctx, output, examine)


@app.command("status")
def status_command(
    ctx: typer.Context,
    output: str = typer.Option("text", "--format", help="text or json.", metavar="text|json"),
) -> None:
    """Compare the namespace's live rules with the plan of the given flags: exit 0 in sync, 1 on drift."""

    def examine(config: configuration.Config, plan: Plan) -> tuple[bool, str, str]:
        from .status import render_status_json, render_status_text, status  # noqa: PLC0415

        report = status(config, plan)
        return report.in_sync, render_status_text(report), render_status_json(report)

    _answer(ctx, output, examine)


def _answer(
    ctx: typer.Context, output: str, examine: Callable[[configuration.Config, Plan], tuple[bool, str, str]]
) -> None:
    """A read-only look at the namespace: its report on stdout, exit 0 for yes, 1 for no."""
    config: configuration.Config = ctx.obj
    output = _output_format(output, ("text", "json"))
    _, plan = cli.enter(config, changes_system=False)
    ok, text, json_text = examine(config, plan)
    sys.stdout.write(json_text if output == "json" else text)
    raise typer.Exit(0 if ok else 1)


def _checked(flag: str, value: str, parse: Callable[[str], T]) -> T:
    """A subcommand option parsed, or the same one-line error as every other bad value."""
    try:
        return parse(value)
    except ValueError as error:
        raise ConfigError(f"invalid value for {flag}: '{configuration.shown(value)}': {error}") from None


@app.command("trace")
def trace_command(
    ctx: typer.Context,
    direction: str = typer.Argument(..., metavar="outbound|inbound", help="Which way the flow goes."),
    *,
    dst: str = typer.Option("", "--dst", help="Outbound: ADDRESS:PORT dialled ([ADDRESS]:PORT for IPv6)."),
    port: str = typer.Option("", "--port", help="Inbound: the pod's port the peer dials."),
    src: str = typer.Option("", "--src", help="Source address (default: the pod, or the peer for inbound)."),
    uid: str = typer.Option("1000", "--uid", help="Outbound: UID of the sending process."),
    gid: str = typer.Option("", "--gid", help="Outbound: GID of the sending process (default: the UID)."),
    protocol: str = typer.Option("tcp", "--proto", metavar="tcp|udp", help="Protocol."),
    in_interface: str = typer.Option("eth0", "--in-interface", help="Inbound: the interface it arrives on."),
    out_interface: str = typer.Option("", "--out-interface", help="Outbound: default lo for local addresses."),
    mark: str = typer.Option("0", "--mark", help="Packet mark."),
    state: str = typer.Option("NEW", "--state", metavar="NEW|ESTABLISHED|RELATED|INVALID", help="Conntrack."),
    live: bool = typer.Option(False, "--live", help="Trace the namespace's live rules, not the plan."),
    output: str = typer.Option("text", "--format", metavar="text|json", help="text or json."),
) -> None:
    """Walk one flow through the rules: every rule it meets, and whether the proxy gets it and why."""
    from .render.trace import render_trace_json, render_trace_text  # noqa: PLC0415
    from .trace import Flow, parse_endpoint, trace  # noqa: PLC0415

    config: configuration.Config = ctx.obj
    output = _output_format(output, ("text", "json"))
    common = {
        "protocol": _checked("--proto", protocol, lambda text: Proto(text.lower()).value),
        "mark": _checked("--mark", mark, lambda text: configuration.parse_decimal(text, 0, 0xFFFFFFFF, "mark")),
        "state": _checked("--state", state, lambda text: CtState(text.upper()).value),
    }
    source = _checked("--src", src, configuration.parse_address) if src else None
    if direction == "outbound":
        if not dst:
            raise ConfigError("trace outbound needs --dst ADDRESS:PORT")
        address, dst_port = _checked("--dst", dst, parse_endpoint)
        flow = Flow.outbound(
            address,
            dst_port,
            uid=_checked("--uid", uid, configuration.parse_id),
            gid=_checked("--gid", gid, configuration.parse_id) if gid else None,
            source=source,
            out_interface=_checked("--out-interface", out_interface, configuration.parse_interface)
            if out_interface
            else None,
            **common,  # type: ignore[arg-type]
        )
    elif direction == "inbound":
        flow = Flow.inbound(
            _checked("--port", port or "", configuration.parse_port),
            source=source,
            in_interface=_checked("--in-interface", in_interface, configuration.parse_interface),
            **common,  # type: ignore[arg-type]
        )
    else:
        raise ConfigError(f"invalid value for the direction: '{configuration.shown(direction)}': outbound or inbound")
    _, plan = cli.enter(config, changes_system=False) if live else (None, build_plan(config, gather(config)))
    rules, sets = _live_rules(config, plan, flow.family) if live else (plan, plan.sets)
    result = trace(rules, flow, groups=_group_ids(plan), sets=sets)
    sys.stdout.write(render_trace_json(result) if output == "json" else render_trace_text(result))


@app.command("graph")
def graph_command(
    ctx: typer.Context,
    output: str = typer.Option("mermaid", "--format", metavar="mermaid|dot", help="mermaid or dot."),
    family: str = typer.Option("", "--family", metavar="ipv4|ipv6", help="One family only (default: all)."),
) -> None:
    """Draw the plan: hooks, tables, chains, jumps and verdicts, as Mermaid or Graphviz DOT."""
    from .render.graph import render_graph  # noqa: PLC0415

    config: configuration.Config = ctx.obj
    fmt = _output_format(output, ("mermaid", "dot"))
    families = {family.label: family for family in Family}
    if family and family not in families:
        raise ConfigError(f"invalid value for --family: '{configuration.shown(family)}': must be ipv4 or ipv6")
    chosen = families.get(family)
    plan = build_plan(config, gather(config))
    sys.stdout.write(render_graph(plan, fmt, family=chosen))  # type: ignore[arg-type]


cni_app = typer.Typer(
    help="Install or uninstall the CNI plugin on a node (what the DaemonSet in deploy/ runs).",
    no_args_is_help=True,
)
app.add_typer(cni_app, name="cni")

CNI_PLUGIN_IN_IMAGE = "/opt/istio-iptables/cni/istio-iptables-cni"


@cni_app.command("install")
def cni_install_command(
    *,
    conf_dir: str = typer.Option(..., "--cni-conf-dir", metavar="DIR", help="The node's CNI conf dir."),
    bin_dir: str = typer.Option(..., "--cni-bin-dir", metavar="DIR", help="The node's CNI bin dir."),
    plugin: str = typer.Option(
        CNI_PLUGIN_IN_IMAGE, "--plugin", metavar="FILE", help="The self-contained plugin executable to copy."
    ),
    plugin_config: str = typer.Option(
        "", "--plugin-config", metavar="FILE", help="A JSON object: the plugin's settings, put in its entry."
    ),
    watch: bool = typer.Option(False, "--watch", help="Stay up and re-install when the configuration is rewritten."),
    interval: str = typer.Option("1", "--interval", metavar="SECONDS", help="With --watch: how often to look."),
    write_kubeconfig: bool = typer.Option(
        False,
        "--write-kubeconfig",
        help="Give the plugin a kubeconfig of this pod's service account, for runtimes that do not pass the pod's "
        "annotations (needs KUBERNETES_SERVICE_HOST and _PORT).",
    ),
    service_account_dir: str = typer.Option(
        "/var/run/secrets/kubernetes.io/serviceaccount", "--service-account-dir", metavar="DIR", help="Its token."
    ),
    host_conf_dir: str = typer.Option(
        "/etc/cni/net.d", "--host-cni-conf-dir", metavar="DIR", help="The conf dir as the node sees it."
    ),
) -> None:
    """Copy the plugin into the bin dir and append its entry to the first configuration file of the conf dir."""
    import os  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from .cni import install  # noqa: PLC0415

    settings = _plugin_settings(plugin_config)
    account = None
    if write_kubeconfig:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST", ""), os.environ.get("KUBERNETES_SERVICE_PORT", "")
        if not host or not port:
            raise ConfigError("--write-kubeconfig needs KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT (in a pod)")
        server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        account = install.ServiceAccount(Path(service_account_dir), server, host_conf_dir)
    node = (Path(conf_dir), Path(bin_dir), Path(plugin), settings, account)
    if not watch:
        install.install(*node)
        return
    period = _checked("--interval", interval, _positive_seconds)
    install.watch(*node, interval=period, stop=install.stop_on_signals())


@cni_app.command("uninstall")
def cni_uninstall_command(
    *,
    conf_dir: str = typer.Option(..., "--cni-conf-dir", metavar="DIR", help="The node's CNI conf dir."),
    bin_dir: str = typer.Option(..., "--cni-bin-dir", metavar="DIR", help="The node's CNI bin dir."),
) -> None:
    """Restore the configuration file as it was before install (byte for byte), then remove the plugin."""
    from pathlib import Path  # noqa: PLC0415

    from .cni import install  # noqa: PLC0415

    install.uninstall(Path(conf_dir), Path(bin_dir))


def _plugin_settings(path: str) -> dict[str, Any]:
    if not path:
        return {}
    import json  # noqa: PLC0415

    try:
        with open(path, "rb") as file:
            settings = json.load(file)
    except OSError as error:
        raise ConfigError(f"invalid value for --plugin-config: '{path}': {error.strerror}") from None
    except ValueError as error:
        raise ConfigError(f"invalid value for --plugin-config: '{path}': not JSON ({error})") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"invalid value for --plugin-config: '{path}': not a JSON object")
    return settings


def _positive_seconds(text: str) -> float:
    seconds = float(text)
    if not 0 < seconds <= 3600:
        raise ValueError("must be over 0 and at most 3600 seconds")
    return seconds


def _group_ids(plan: Plan) -> dict[str, int]:
    """Owner groups written by name, with the ids the kernel would store for them."""
    from .apply import group_id  # noqa: PLC0415

    names = {
        clause.group
        for ruleset in plan.rulesets
        for rule in ruleset.rules
        for clause in rule.clauses
        if isinstance(clause, GidOwner) and isinstance(clause.group, str)
    }
    return {name: gid for name in names if isinstance(gid := group_id(name), int)}


def _live_rules(config: configuration.Config, plan: Plan, family: Family) -> tuple[Any, Sequence[AddressSet | PortSet]]:
    """The live rules of the flow's family (and the sets they look up), read from whichever backend holds
    them: native nftables with --native-nftables, else the iptables variant detection finds."""
    if config.native_nftables:
        from .backends import nft  # noqa: PLC0415

        state = nft.detect().saved
        return state.family_tables(family), state.sets
    from .apply import observe, xtables_environment  # noqa: PLC0415

    seen = next((s for s in observe(config, plan, xtables_environment(config)) if s.target.family is family), None)
    if seen is None:
        raise ConfigError(f"--live: no {family.label} rules can be read here")
    uses_sets = any("--match-set ISTIO_" in entry.text for state in seen.live.values() for entry in state.entries)
    if not uses_sets:
        return seen.live, ()
    from .backends import ipset  # noqa: PLC0415

    return seen.live, ipset.as_model(ipset.read())


def main(arguments: list[str]) -> int:
    """Parse and run ``arguments`` with Typer; its usage errors become ConfigError (exit 2)."""
    try:
        code = typer.main.get_command(app).main(args=arguments, prog_name=cli.PROG, standalone_mode=False)
    except Exception as error:
        # Typer's own usage errors (unknown flag, missing value); its exception classes are not public.
        if not (hasattr(error, "format_message") and hasattr(error, "exit_code")):
            raise
        raise ConfigError(error.format_message()) from None
    return code if isinstance(code, int) else 0
