"""The Typer application: ``--help``, the subcommands, and every command line the fast path of ``cli.main``
leaves to it. Importing Typer costs more than Istio's whole detection sequence, so a plain run never loads
this module.

The options are generated from ``config.SETTINGS`` so the flag table exists once. Every option arrives as
text (or a switch) and ``config.load`` parses it, which gives every bad value the same one-line error.
"""

from __future__ import annotations

import enum
import gc
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TypeVar

import typer

from istio_iptables.capture import config as configuration
from istio_iptables.capture.model import CtState, Family, GidOwner, Plan, Proto
from istio_iptables.capture.plan import build_plan
from istio_iptables.cli import command
from istio_iptables.errors import PROG, ConfigError
from istio_iptables.host.hostfacts import enter, gather

if TYPE_CHECKING:
    from istio_iptables.explain.trace import Flow, Trace

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)

_SETTINGS = {
    "add_completion": True,
    "pretty_exceptions_enable": False,
    "rich_markup_mode": None,
    "context_settings": {"help_option_names": ["-h", "--help"], "max_content_width": 120},
}
_EPILOG = (
    "Environment only: "
    + "; ".join(
        f"{setting.envvars[0]} ({setting.help.rstrip('.')}; default: {setting.default or '(empty)'})"
        for setting in configuration.SETTINGS
        if not setting.flags
    )
    + ". Exit codes: 0 success, 1 apply or host failure, 2 bad input, 126 validation failed."
)

app = typer.Typer(
    **_SETTINGS,  # type: ignore[arg-type]
    help="Make every TCP connection of a pod, and optionally its DNS, go through the sidecar proxy: "
    "the rules of Istio's istio-iptables for the same flags, printed (--dry-run) or applied.",
    epilog=_EPILOG,
)

clean_app = typer.Typer(**_SETTINGS)  # type: ignore[arg-type]


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


STANDALONE_COMMANDS = {"inject"}
"""Subcommands that take none of the capture's flags or environment: no Config is made for them."""


def _print_version(ctx: typer.Context, wanted: bool) -> None:
    if wanted:
        from importlib.metadata import version  # noqa: PLC0415 (only --version needs it)

        print(f"{ctx.info_name} {version('istio-iptables')}")
        raise typer.Exit()


def _signature(settings: Sequence[configuration.Setting]) -> inspect.Signature:
    """The command's parameters: the context, an option per setting with a flag, and ``--version``."""
    version = typer.Option(
        False, "--version", is_eager=True, expose_value=False, callback=_print_version, help="Print the version."
    )
    return inspect.Signature(
        [
            inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
            *(_option(setting) for setting in settings),
            inspect.Parameter("version", inspect.Parameter.KEYWORD_ONLY, default=version, annotation=bool),
        ]
    )


def capture(ctx: typer.Context, **given: Any) -> None:
    if ctx.invoked_subcommand in STANDALONE_COMMANDS:
        return
    ctx.obj = command.configured(given)
    if ctx.invoked_subcommand is None:
        command.run(ctx.obj)


capture.__signature__ = _signature(  # type: ignore[attr-defined]
    [setting for setting in configuration.SETTINGS if setting.flags]
)
app.callback(invoke_without_command=True)(capture)


def clean(ctx: typer.Context, **given: Any) -> None:
    command.run(command.configured({**given, "cleanup_only": True}))


clean.__signature__ = _signature(  # type: ignore[attr-defined]
    [setting for setting in configuration.SETTINGS if setting.flags and setting.key != "cleanup_only"]
)
clean_app.command(
    help="Remove every chain, rule, ip rule, route and ::6 address that istio-iptables may have created in "
    "this network namespace, whatever flags created them: Istio 1.5's istio-clean-iptables, the same as "
    "istio-iptables --cleanup-only. Takes istio-iptables' flags; --dry-run prints the clean-up.",
    epilog=_EPILOG,
)(clean)


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
        from istio_iptables.explain.preflight import preflight, render_preflight_json, render_preflight_text  # noqa: PLC0415

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
        from istio_iptables.explain.status import render_status_json, render_status_text, status  # noqa: PLC0415

        report = status(config, plan)
        return report.in_sync, render_status_text(report), render_status_json(report)

    _answer(ctx, output, examine)


def _answer(
    ctx: typer.Context, output: str, examine: Callable[[configuration.Config, Plan], tuple[bool, str, str]]
) -> None:
    """A read-only look at the namespace: its report on stdout, exit 0 for yes, 1 for no."""
    config: configuration.Config = ctx.obj
    output = _output_format(output, ("text", "json"))
    _, plan = enter(config, changes_system=False)
    ok, text, json_text = examine(config, plan)
    sys.stdout.write(json_text if output == "json" else text)
    raise typer.Exit(0 if ok else 1)


def _checked(flag: str, value: str, parse: Callable[[str], T]) -> T:
    """A subcommand option parsed, or the same one-line error as every other bad value."""
    try:
        return parse(value)
    except ValueError as error:
        raise ConfigError(f"invalid value for {flag}: '{configuration.shown(value)}': {error}") from None


def _choice(kind: type[E], case: Callable[[str], str]) -> Callable[[str], E]:
    """A parser of one of ``kind``'s values, in any case, whose error lists them (not Python's enum wording)."""

    def parse(text: str) -> E:
        try:
            return kind(case(text))
        except ValueError:
            raise ValueError(f"must be one of: {', '.join(str(member.value) for member in kind)}") from None

    return parse


@app.command("trace")
def trace_command(
    ctx: typer.Context,
    direction: str = typer.Argument(
        ..., metavar="outbound|inbound", help="Which way the flow goes.", autocompletion=lambda: ["outbound", "inbound"]
    ),
    *,
    dst: str = typer.Option(
        "", "--dst", metavar="ADDRESS:PORT", help="Outbound: ADDRESS:PORT dialled ([ADDRESS]:PORT for IPv6)."
    ),
    port: str = typer.Option("", "--port", metavar="PORT", help="Inbound: the pod's port the peer dials."),
    src: str = typer.Option(
        "",
        "--src",
        metavar="ADDRESS",
        help="Source address: outbound, one of the pod's (default: the route's); inbound, the peer's.",
    ),
    pod_ips: list[str] = typer.Option(  # noqa: B008 (Typer reads the default)
        [],
        "--pod-ip",
        metavar="ADDRESS",
        help="An address of the pod (repeat for each); default: the namespace's with --live or "
        "--network-namespace, else --src, else 198.18.0.2 and 2001:db8::2, said in the output.",
    ),
    uid: str = typer.Option("1000", "--uid", metavar="UID", help="Outbound: UID of the sending process."),
    gid: str = typer.Option(
        "", "--gid", metavar="GID", help="Outbound: GID of the sending process (default: the UID)."
    ),
    protocol: str = typer.Option("tcp", "--proto", metavar="tcp|udp", help="Protocol."),
    in_interface: str = typer.Option(
        "",
        "--in-interface",
        metavar="NIC",
        help="Inbound: the interface it arrives on (default: the one holding the address).",
    ),
    out_interface: str = typer.Option(
        "",
        "--out-interface",
        metavar="NIC",
        help="Outbound: default the route's (lo for the pod's own and loopback addresses).",
    ),
    mark: str = typer.Option("0", "--mark", metavar="MARK", help="Packet mark."),
    state: str = typer.Option("NEW", "--state", metavar="NEW|ESTABLISHED|RELATED|INVALID", help="Conntrack."),
    live: bool = typer.Option(False, "--live", help="Trace the namespace's live rules, not the plan."),
    output: str = typer.Option("text", "--format", metavar="text|json", help="text or json."),
) -> None:
    """Walk one flow through the rules: every rule it meets, and whether the proxy gets it and why."""
    from istio_iptables.explain.trace import ASSUMED_POD, Flow, Pod, parse_endpoint, trace, unsent  # noqa: PLC0415
    from istio_iptables.explain.trace_output import render_trace_json, render_trace_text  # noqa: PLC0415

    config: configuration.Config = ctx.obj
    output = _output_format(output, ("text", "json"))
    common = {
        "protocol": _checked("--proto", protocol, _choice(Proto, str.lower)).value,
        "mark": _checked("--mark", mark, lambda text: configuration.parse_decimal(text, 0, 0xFFFFFFFF, "mark")),
        "state": _checked("--state", state, _choice(CtState, str.upper)).value,
    }
    source = _checked("--src", src, configuration.parse_address) if src else None
    given_pod = tuple(_checked("--pod-ip", text, configuration.parse_address) for text in pod_ips)
    if direction not in ("outbound", "inbound"):
        raise ConfigError(f"invalid value for the direction: '{configuration.shown(direction)}': outbound or inbound")
    if direction == "outbound" and not dst:
        raise ConfigError("trace outbound needs --dst ADDRESS:PORT")
    # In a namespace (the live one, or the one named), its addresses and routes say where a flow goes;
    # elsewhere the plan's pod is what the flags say, or an assumption the output states.
    in_namespace = live or bool(config.network_namespace)
    _, plan = enter(config, changes_system=False) if in_namespace else (None, build_plan(config, gather(config)))
    if in_namespace:
        from istio_iptables.host.podnet import facing, pod_interfaces, route  # noqa: PLC0415

        if given_pod:
            pod = Pod(given_pod, "--pod-ip")
        else:
            interfaces = pod_interfaces()
            pod = Pod(tuple(address for address, _ in interfaces), "the namespace", interfaces)
    else:
        pod = Pod(given_pod, "--pod-ip") if given_pod else ASSUMED_POD
        if not given_pod and source is not None and direction == "outbound":
            pod = Pod((source,), "--src")
    no_route = ""
    if direction == "outbound":
        address, dst_port = _checked("--dst", dst, parse_endpoint)
        if source is not None and source.version != address.version:
            raise ConfigError(
                f"invalid value for --src: '{configuration.shown(src)}': an IPv{source.version} address, "
                f"but --dst {configuration.shown(dst)} is IPv{address.version}"
            )
        chosen_interface = (
            _checked("--out-interface", out_interface, configuration.parse_interface) if out_interface else None
        )
        flow_uid = _checked("--uid", uid, configuration.parse_id)
        if in_namespace and chosen_interface is None:
            found = route(address, source=source, mark=int(common["mark"]), uid=flow_uid)
            if isinstance(found, str):
                no_route = f"the namespace has no route to {address} ({found}): the connection fails before any rule"
            else:
                source, chosen_interface = source or found.source, found.interface
        flow = Flow.outbound(
            address,
            dst_port,
            uid=flow_uid,
            gid=_checked("--gid", gid, configuration.parse_id) if gid else None,
            source=source,
            out_interface=chosen_interface,
            pod=pod,
            **common,  # type: ignore[arg-type]
        )
        assumed = "" if in_namespace or source is not None else pod.assumption(flow.family)
    else:
        if not port:
            raise ConfigError("trace inbound needs --port PORT")
        arrives = _checked("--in-interface", in_interface, configuration.parse_interface) if in_interface else None
        destination = None
        if in_namespace and source is not None and not given_pod:
            back = facing(source)
            if back is not None:
                destination, arrives = back.source, arrives or back.interface
        flow = Flow.inbound(
            _checked("--port", port, configuration.parse_port),
            destination=destination,
            source=source,
            in_interface=arrives,
            pod=pod,
            **common,  # type: ignore[arg-type]
        )
        assumed = "" if destination is not None else pod.assumption(flow.family)
    if no_route:
        result = unsent(flow, no_route)
    elif live:
        result = _trace_live(config, plan, flow, (assumed,) if assumed else ())
    else:
        assumptions = (assumed,) if assumed else ()
        result = trace(plan, flow, groups=_group_ids(plan), assumed=assumptions, nft=config.native_nftables)
    sys.stdout.write(render_trace_json(result) if output == "json" else render_trace_text(result))


@app.command("graph")
def graph_command(
    ctx: typer.Context,
    output: str = typer.Option("mermaid", "--format", metavar="mermaid|dot", help="mermaid or dot."),
    family: str = typer.Option("", "--family", metavar="ipv4|ipv6", help="One family only (default: all)."),
) -> None:
    """Draw the plan: hooks, tables, chains, jumps and verdicts, as Mermaid or Graphviz DOT."""
    from istio_iptables.explain.graph import render_graph  # noqa: PLC0415

    config: configuration.Config = ctx.obj
    fmt = _output_format(output, ("mermaid", "dot"))
    families = {family.label: family for family in Family}
    if family and family not in families:
        raise ConfigError(f"invalid value for --family: '{configuration.shown(family)}': must be ipv4 or ipv6")
    chosen = families.get(family)
    _, plan = enter(config, changes_system=False)
    sys.stdout.write(render_graph(plan, fmt, family=chosen))  # type: ignore[arg-type]


@app.command("inject")
def inject_command(
    *,
    filename: str = typer.Option(..., "-f", "--filename", metavar="FILE|-", help="Manifests to inject (- for stdin)."),
    output: str = typer.Option("", "-o", "--output", metavar="FILE", help="Write here instead of stdout."),
    sets: list[str] = typer.Option(  # noqa: B008 (Typer's way of declaring a repeatable option)
        [], "--set", metavar="PATH=VALUE", help="An Istio setting (values.…, meshConfig.…, components.cni.enabled)."
    ),
    values: str = typer.Option(
        "", "--values", metavar="FILE", help="Istio's values tree (YAML/JSON, or the ConfigMap)."
    ),
    mesh_config: str = typer.Option(
        "", "--mesh-config", metavar="FILE", help="Istio's mesh config (or its ConfigMap)."
    ),
    image: str = typer.Option(
        "", "--image", metavar="IMAGE", help="The init container's image (default: this project's image)."
    ),
    hardened: bool = typer.Option(False, "--hardened", help="Non-root, read-only init container (see README)."),
    injector_config: str = typer.Option(
        "", "--injector-config", metavar="FILE|istio|relay", help="The sidecar template's ConfigMap, or a shipped one."
    ),
    capture_only: bool = typer.Option(False, "--capture-only", help="Inject the capture into pods that get no proxy."),
    namespace_labels: str = typer.Option(
        "", "--namespace-labels", metavar="K=V,...", help="The namespace's labels, for the injection decision."
    ),
    explain: bool = typer.Option(False, "--explain", help="Say on stderr why each workload is (not) injected."),
) -> None:
    """Add the proxy from the injector's template and the capture's init container to every workload, as
    Istio's injector does."""
    from istio_iptables.kube.manifests import run_inject  # noqa: PLC0415

    run_inject(
        filename,
        output=output,
        sets=sets,
        values_file=values,
        mesh_file=mesh_config,
        image=image,
        hardened=hardened,
        injector_config=injector_config,
        capture_only=capture_only,
        namespace_labels=namespace_labels,
        explain=explain,
    )


@app.command("webhook")
def webhook_command(
    *,
    tls_cert_file: str = typer.Option(..., "--tls-cert-file", metavar="FILE", help="PEM certificate chain."),
    tls_key_file: str = typer.Option(..., "--tls-key-file", metavar="FILE", help="Its PEM private key."),
    port: str = typer.Option("9443", "--port", metavar="PORT", help="HTTPS port (0: any free port, logged)."),
    address: str = typer.Option(
        "::", "--address", metavar="ADDRESS", help="Address to listen on (default: every address, IPv4 and IPv6)."
    ),
    sets: list[str] = typer.Option(  # noqa: B008 (Typer's way of declaring a repeatable option)
        [], "--set", metavar="PATH=VALUE", help="An Istio setting, as for inject."
    ),
    values: str = typer.Option("", "--values", metavar="FILE", help="Istio's values tree, as for inject."),
    mesh_config: str = typer.Option("", "--mesh-config", metavar="FILE", help="Istio's mesh config, as for inject."),
    image: str = typer.Option("", "--image", metavar="IMAGE", help="The init container's image, as for inject."),
    hardened: bool = typer.Option(False, "--hardened", help="Non-root, read-only init container, as for inject."),
    injector_config: str = typer.Option(
        "", "--injector-config", metavar="FILE|istio|relay", help="The sidecar template's ConfigMap, as for inject."
    ),
    capture_only: bool = typer.Option(False, "--capture-only", help="As for inject."),
) -> None:
    """Admission webhook (HTTPS): inject each pod Kubernetes creates as inject would (POST /inject, GET /ready).
    The certificate files are reloaded when they change; SIGTERM drains and exits."""
    from istio_iptables.kube.inject import injected_pod  # noqa: PLC0415
    from istio_iptables.kube.manifests import load_injector  # noqa: PLC0415
    from istio_iptables.kube.webhook import Listen, serve  # noqa: PLC0415

    listen = Listen(
        address=str(_checked("--address", address, configuration.parse_address)),
        port=_checked("--port", port, lambda text: configuration.parse_decimal(text, 0, 65535, "port")),
        cert_file=tls_cert_file,
        key_file=tls_key_file,
    )
    injector = load_injector(
        sets=sets,
        values_file=values,
        mesh_file=mesh_config,
        image=image,
        hardened=hardened,
        injector_config=injector_config,
        capture_only=capture_only,
    )
    _stays_up()
    serve(listen, lambda pod, workload, namespace: injected_pod(pod, injector, workload=workload, namespace=namespace))


cni_app = typer.Typer(
    help="Install or uninstall the CNI plugin on a node, or repair its pods (what the DaemonSet in deploy/ runs).",
    no_args_is_help=True,
)
app.add_typer(cni_app, name="cni")

CNI_PLUGIN_IN_IMAGE = "/opt/istio-iptables/cni/istio-iptables-cni"


_CONF_DIR_HELP = "The node's CNI conf dir, as the node sees it [default: the runtime's, from its configuration]."
_BIN_DIR_HELP = "The node's CNI bin dir, as the node sees it [default: the runtime's, from its configuration]."
_NODE_ROOT_HELP = "Where the node's file system is mounted here (the DaemonSet mounts it at /host)."


@cni_app.command("install")
def cni_install_command(
    *,
    conf_dir: str = typer.Option("", "--cni-conf-dir", metavar="DIR", envvar="CNI_CONF_DIR", help=_CONF_DIR_HELP),
    bin_dir: str = typer.Option("", "--cni-bin-dir", metavar="DIR", envvar="CNI_BIN_DIR", help=_BIN_DIR_HELP),
    node_root: str = typer.Option("/", "--node-root", metavar="DIR", envvar="CNI_NODE_ROOT", help=_NODE_ROOT_HELP),
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
    agent_socket: str = typer.Option(
        "",
        "--agent-socket",
        metavar="PATH",
        help="The node agent's socket (cni agent --socket), as the node sees it: the plugin hands its requests "
        "to the agent there [default: no agent; the plugin runs them itself].",
    ),
) -> None:
    """Copy the plugin into the bin dir and append its entry to the first configuration file of the conf dir."""
    import os  # noqa: PLC0415

    from istio_iptables.cni import install  # noqa: PLC0415

    settings = _plugin_settings(plugin_config)
    if agent_socket and not agent_socket.startswith("/"):
        raise ConfigError(
            f"invalid value for --agent-socket: '{agent_socket}': must be an absolute path (as the node sees it)"
        )
    root, node_conf_dir, node_bin_dir = _node_paths(node_root, conf_dir, bin_dir)
    here = (root / node_conf_dir.lstrip("/"), root / node_bin_dir.lstrip("/"))
    account = None
    if write_kubeconfig:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST", ""), os.environ.get("KUBERNETES_SERVICE_PORT", "")
        if not host or not port:
            raise ConfigError("--write-kubeconfig needs KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT (in a pod)")
        server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        account = install.ServiceAccount(Path(service_account_dir), server, node_conf_dir)
    node = (*here, Path(plugin), settings, account)
    if not watch:
        install.install(*node, root=root, agent_socket=agent_socket)
        return
    period = _checked("--interval", interval, _positive_seconds)
    _stays_up()
    install.watch(*node, interval=period, stop=install.stop_on_signals(), root=root, agent_socket=agent_socket)


@cni_app.command("uninstall")
def cni_uninstall_command(
    *,
    conf_dir: str = typer.Option("", "--cni-conf-dir", metavar="DIR", envvar="CNI_CONF_DIR", help=_CONF_DIR_HELP),
    bin_dir: str = typer.Option("", "--cni-bin-dir", metavar="DIR", envvar="CNI_BIN_DIR", help=_BIN_DIR_HELP),
    node_root: str = typer.Option("/", "--node-root", metavar="DIR", envvar="CNI_NODE_ROOT", help=_NODE_ROOT_HELP),
) -> None:
    """Restore the configuration file as it was before install (byte for byte), then remove the plugin."""
    from istio_iptables.cni import install  # noqa: PLC0415

    root, node_conf_dir, node_bin_dir = _node_paths(node_root, conf_dir, bin_dir)
    install.uninstall(root / node_conf_dir.lstrip("/"), root / node_bin_dir.lstrip("/"), root=root)


def _node_paths(node_root: str, conf_dir: str, bin_dir: str) -> tuple[Path, str, str]:
    """The node's root here, and its CNI dirs as the node sees them: as given, else as its runtime says."""

    from istio_iptables.cni import nodepaths  # noqa: PLC0415
    from istio_iptables.log import Log  # noqa: PLC0415

    root = Path(node_root)
    if not root.is_dir():
        raise ConfigError(f"invalid value for --node-root: '{node_root}': not a directory")
    for flag, given in (("--cni-conf-dir", conf_dir), ("--cni-bin-dir", bin_dir)):
        if given and not given.startswith("/"):
            raise ConfigError(f"invalid value for {flag}: '{given}': must be an absolute path (as the node sees it)")
    if conf_dir and bin_dir:
        return root, conf_dir, bin_dir
    found = nodepaths.discover(root)
    Log(nodepaths.__name__).info(f"CNI conf dir {found.conf_dir}, bin dir {found.bin_dir}: from {found.source}")
    for flag, given, node_dir, what in (
        ("--cni-conf-dir", conf_dir, found.conf_dir, "conf dir"),
        ("--cni-bin-dir", bin_dir, found.bin_dir, "bin dir"),
    ):
        if not given and not nodepaths.under(root, node_dir).is_dir():
            raise ConfigError(
                f"the runtime's CNI {what} {node_dir} (from {found.source}) is not a directory under {root}: "
                f"pass {flag}"
            )
    return root, conf_dir or found.conf_dir, bin_dir or found.bin_dir


@cni_app.command("agent")
def cni_agent_command(
    *,
    socket_path: str = typer.Option(
        "/var/run/istio-iptables-cni/agent.sock",
        "--socket",
        metavar="PATH",
        help="Where to listen (its directory is made mode 0700 if missing; a stale socket is replaced).",
    ),
    request_timeout: str = typer.Option(
        "20", "--request-timeout", metavar="SECONDS", help="How long one request may run before it is stopped."
    ),
) -> None:
    """Serve the plugin's requests from a warm process: the thin plugin on the node hands each ADD, DEL and
    CHECK to this agent, and runs the self-contained plugin itself when the agent does not answer
    (docs/cni.md, "The node agent")."""
    from istio_iptables.cni import agent  # noqa: PLC0415

    if not socket_path.startswith("/"):
        raise ConfigError(f"invalid value for --socket: '{socket_path}': must be an absolute path")
    timeout = _checked("--request-timeout", request_timeout, _positive_seconds)
    _stays_up()
    agent.run(agent.AgentOptions(Path(socket_path), request_timeout=timeout))


@cni_app.command("repair")
def cni_repair_command(
    *,
    cri_socket: str = typer.Option(
        "unix:///run/containerd/containerd.sock", "--cri-socket", metavar="ADDRESS", help="The runtime's CRI socket."
    ),
    plugin_config: str = typer.Option(
        "", "--plugin-config", metavar="FILE", help="The plugin's settings, as given to install: the same capture."
    ),
    kubeconfig: str = typer.Option(
        "",
        "--kubeconfig",
        metavar="FILE",
        help="Credentials to delete a pod that cannot be captured in place (none: such pods are only reported).",
    ),
    delete_bare_pods: bool = typer.Option(False, "--delete-bare-pods", help="Delete even pods without an owner."),
    delete_job_pods: bool = typer.Option(
        False, "--delete-job-pods", help="Delete even pods of a Job whose restartPolicy is Never."
    ),
    interval: str = typer.Option("5", "--interval", metavar="SECONDS", help="How often to look."),
    max_per_cycle: str = typer.Option("10", "--max-per-cycle", metavar="N", help="Pods looked into per cycle."),
    once: bool = typer.Option(False, "--once", help="One cycle, then exit."),
) -> None:
    """Capture in place the pods of this node injected for CNI mode that their network set-up left uncaptured
    (created while the plugin was not installed), found through the container runtime (docs/cni.md, Repair)."""
    from istio_iptables.cni import install, repair  # noqa: PLC0415
    from istio_iptables.cni.plugin import parse_plugin_config  # noqa: PLC0415
    from istio_iptables.cni.protocol import CniError  # noqa: PLC0415
    from istio_iptables.kube.capture import load_settings  # noqa: PLC0415
    from istio_iptables.log import LogLevel, LogOptions, configure  # noqa: PLC0415

    try:
        plugin = parse_plugin_config(_plugin_settings(plugin_config))
    except CniError as error:
        raise ConfigError(f"invalid value for --plugin-config: '{plugin_config}': {error.message}") from None
    load_settings(values=plugin.values, mesh_config=plugin.mesh_config)  # a bad setting: one line, before any pod
    configure(LogOptions(level=plugin.log_level or LogLevel.INFO))
    options = repair.RepairOptions(
        plugin=plugin,
        kubeconfig=kubeconfig,
        delete_bare_pods=delete_bare_pods,
        delete_job_pods=delete_job_pods,
        max_per_cycle=_checked(
            "--max-per-cycle", max_per_cycle, lambda text: configuration.parse_decimal(text, 1, 1000, "count")
        ),
    )
    period = _checked("--interval", interval, _positive_seconds)
    if not once:
        _stays_up()
    repair.run(cri_socket, options, interval=period, stop=install.stop_on_signals(), once=once)


def _stays_up() -> None:
    """For a command that runs for days: the collector back on. The console entry point turned it off for a
    one-shot run (console.py says why); a server without it grows with every request."""
    gc.enable()


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
    from istio_iptables.apply import group_id  # noqa: PLC0415

    names = {
        clause.group
        for ruleset in plan.rulesets
        for rule in ruleset.rules
        for clause in rule.clauses
        if isinstance(clause, GidOwner) and isinstance(clause.group, str)
    }
    return {name: gid for name in names if isinstance(gid := group_id(name), int)}


def _trace_live(config: configuration.Config, plan: Plan, flow: Flow, assumed: tuple[str, ...]) -> Trace:
    """The flow through the live rules of its family, read from whichever copy holds them."""
    from istio_iptables.apply import xtables_environment  # noqa: PLC0415
    from istio_iptables.backends import live  # noqa: PLC0415
    from istio_iptables.explain.trace import trace  # noqa: PLC0415

    found = live.read(flow.family, xtables_environment())
    tables = found.walked.tables if found.walked is not None else {}
    sets = found.walked.sets if found.walked is not None else ()
    nft = found.walked is not None and found.walked.nft
    return trace(
        tables, flow, groups=_group_ids(plan), sets=sets, assumed=assumed, not_walked=found.not_walked, nft=nft
    )


def main(arguments: list[str], clean: bool = False) -> int:
    """Parse and run ``arguments`` with Typer (``istio-clean-iptables``'s command when ``clean``); its usage
    errors become ConfigError (exit 2)."""
    typer_command = typer.main.get_command(clean_app if clean else app)
    try:
        code = typer_command.main(
            args=arguments, prog_name=command.CLEAN_PROG if clean else PROG, standalone_mode=False
        )
    except Exception as error:
        # Typer's own usage errors (unknown flag, missing value); its exception classes are not public.
        if not (hasattr(error, "format_message") and hasattr(error, "exit_code")):
            raise
        if clean and getattr(error, "option_name", "") in ("--cleanup-only", "--no-cleanup-only"):
            raise ConfigError(f"{command.CLEAN_PROG} only cleans up; to apply, run {PROG}") from None
        raise ConfigError(_misplaced(typer_command, error) or error.format_message()) from None
    return code if isinstance(code, int) else 0


def _misplaced(command: Any, error: Any) -> str | None:
    """For an unknown option that another level of the command line has: where it belongs. A subcommand's
    option given before the subcommand, or a flag of the main command given after it."""
    name, context = getattr(error, "option_name", None), getattr(error, "ctx", None)
    if name is None or context is None:
        return None
    if context.parent is None:
        owners = [
            sub
            for sub, subcommand in getattr(command, "commands", {}).items()
            if any(name in (*param.opts, *param.secondary_opts) for param in subcommand.params)
        ]
        if owners:
            quoted = [f"'{owner}'" for owner in owners]
            where = " and ".join([", ".join(quoted[:-1]), quoted[-1]] if len(quoted) > 1 else quoted)
            example = f"{PROG} [FLAGS] {owners[0]} ... {name} ..."
            return f"{name} is an option of {where}: give it after the subcommand ({example})"
    elif any(name in (*param.opts, *param.secondary_opts) for param in command.params):
        sub = context.info_name
        return f"{name} is a flag of {PROG} itself: give it before '{sub}' ({PROG} {name} ... {sub} ...)"
    return None
