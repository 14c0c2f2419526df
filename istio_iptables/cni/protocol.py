"""The CNI protocol (spec 1.0.0, with 0.3.1 and 0.4.0): what a runtime hands a plugin and what it expects back.

A runtime runs the plugin with ``CNI_*`` variables in the environment and the network configuration on stdin:
the plugin's own object from the list, with the list's ``cniVersion`` and ``name``, the previous plugin's
``prevResult`` and the ``runtimeConfig`` of the capabilities the plugin declares. A chained plugin that adds
no interface prints ``prevResult`` unchanged after an ADD; an error is a JSON object on stdout and a non-zero
exit. Pure: the caller reads stdin and the environment and writes stdout.

JSON goes through the standard library's C scanner and encoder (``_json``) directly: importing ``json``
compiles its pure-Python fallback's regular expressions and loads ``re`` and ``enum``, about a third of the
plugin's whole run for a pod it leaves alone. Anything the C scanner refuses is handed to ``json`` itself,
whose answer (its value, or its error message) is the one given.
"""

from __future__ import annotations

import _json
from collections.abc import Mapping

from istio_iptables.records import record

CURRENT_VERSION = "1.0.0"
SUPPORTED_VERSIONS = ("0.3.1", "0.4.0", "1.0.0")
CHECK_SINCE = "0.4.0"
"""CHECK came with spec 0.4.0: a configuration of an older version may not ask for it."""
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION")
POD_ANNOTATIONS = "io.kubernetes.cri.pod-annotations"
"""The capability whose runtimeConfig value is the pod's annotations (CRI-O, containerd)."""
DNS = "dns"
"""The capability whose runtimeConfig value is the pod's DNS config, ``{servers, searches, options}``: what the
runtime writes into the pod's resolv.conf (containerd's CRI passes the sandbox's DNSConfig)."""


class CniError(Exception):
    """A failure reported to the runtime as the spec's error object; ``code`` below 100 is the spec's."""

    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    INVALID_ENVIRONMENT = 4
    DECODING_FAILURE = 6
    INVALID_CONFIG = 7
    # This plugin's own codes (100 and up).
    POD_SETTINGS = 100
    """A pod annotation (or the plugin's settings for it) asks for a capture that cannot be built."""
    APPLY_FAILED = 101
    """The kernel or an iptables/nft binary refused the rules; the pod was left without rules of ours."""
    DRIFT = 102
    """CHECK: the pod's rules differ from its plan."""
    POD_UNKNOWN = 103
    """The pod's annotations could not be had (no capability value, and the Kubernetes API failed)."""
    INTERNAL = 199
    """A defect of this plugin (its traceback is in the log)."""

    def __init__(self, code: int, message: str, details: str = "", version: str = "") -> None:
        super().__init__(message)
        self.code, self.message, self.details = code, message, details
        self.version = version
        """The configuration's version, when known before the request is (the error object is of it)."""


@record
class Request:
    command: str
    container_id: str
    netns: str
    """A path (``/var/run/netns/NAME``, ``/proc/PID/ns/net``); may be empty for DEL."""
    ifname: str
    args: Mapping[str, str]
    """``CNI_ARGS`` as a map (``K8S_POD_NAMESPACE``, ``K8S_POD_NAME``, ...)."""
    config: Mapping[str, object]
    """The network configuration from stdin."""

    @property
    def version(self) -> str:
        return str(self.config.get("cniVersion", ""))

    @property
    def prev_result(self) -> object:
        return self.config.get("prevResult")

    @property
    def runtime_config(self) -> Mapping[str, object]:
        runtime = self.config.get("runtimeConfig")
        return runtime if isinstance(runtime, Mapping) else {}

    @property
    def dns_servers(self) -> list[str] | None:
        """The ``servers`` of the pod's DNS config, or None when the runtime passed no ``dns`` capability.
        containerd 1.6 spells the keys as its Go fields (``Servers``, ``Searches``, ``Options``) and a missing
        list as null; CRI-O in lower case, as the CNI conventions do."""
        dns = self.runtime_config.get(DNS)
        if not isinstance(dns, Mapping):
            return None
        servers = dns.get("servers", dns.get("Servers"))
        return [str(server) for server in servers] if isinstance(servers, list) else []

    @property
    def pod(self) -> tuple[str, str] | None:
        """The Kubernetes pod's (namespace, name), or None when the runtime says nothing of a pod."""
        namespace, name = self.args.get("K8S_POD_NAMESPACE", ""), self.args.get("K8S_POD_NAME", "")
        return (namespace, name) if namespace and name else None


def read_request(environ: Mapping[str, str], stdin: bytes) -> Request:
    """The request of a runtime; raises CniError as the spec words each failure."""
    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        shown = f"'{command}'" if command else "not set"
        raise CniError(CniError.INVALID_ENVIRONMENT, f"CNI_COMMAND is {shown}: must be one of {', '.join(COMMANDS)}")
    config = _decode(stdin)
    if command == "VERSION":
        return Request(command, "", "", "", {}, config)
    required = ("CNI_CONTAINERID", "CNI_IFNAME") + (("CNI_NETNS",) if command != "DEL" else ())
    missing = [name for name in required if not environ.get(name)]
    if missing:
        raise CniError(CniError.INVALID_ENVIRONMENT, f"{', '.join(missing)} not set (required for {command})")
    request = Request(
        command,
        environ["CNI_CONTAINERID"],
        environ.get("CNI_NETNS", ""),
        environ["CNI_IFNAME"],
        parse_args(environ.get("CNI_ARGS", "")),
        config,
    )
    _check_version(request)
    return request


def parse_args(text: str) -> dict[str, str]:
    """``CNI_ARGS``: ``K=V`` pairs separated by ``;``."""
    pairs = {}
    for item in text.split(";"):
        if not item:
            continue
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise CniError(CniError.INVALID_ENVIRONMENT, f"CNI_ARGS: '{item}' is not KEY=VALUE")
        pairs[key] = value
    return pairs


def _decode(stdin: bytes) -> dict[str, object]:
    try:
        config = loads(stdin)
    except (ValueError, UnicodeDecodeError) as error:
        raise CniError(CniError.DECODING_FAILURE, f"the network configuration on stdin is not JSON: {error}") from None
    if not isinstance(config, dict):
        raise CniError(CniError.DECODING_FAILURE, "the network configuration on stdin is not a JSON object")
    return config


def _check_version(request: Request) -> None:
    version = request.version
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            CniError.INCOMPATIBLE_VERSION,
            f"incompatible CNI version '{version}'",
            f"supported: {', '.join(SUPPORTED_VERSIONS)}",
        )
    if request.command == "CHECK" and _key(version) < _key(CHECK_SINCE):
        raise CniError(CniError.INCOMPATIBLE_VERSION, f"config version {version} does not allow CHECK", version=version)


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def result_json(request: Request) -> str:
    """ADD's result: the previous plugin's, unchanged (this plugin adds no interface, address or route); an
    empty result of the request's version when the plugin runs first."""
    previous = request.prev_result
    result = dict(previous) if isinstance(previous, Mapping) else {"dns": {}}
    result.setdefault("cniVersion", request.version)
    return dumps(result)


def error_json(error: CniError, version: str) -> str:
    version = version or error.version
    document: dict[str, object] = {
        "cniVersion": version if version in SUPPORTED_VERSIONS else CURRENT_VERSION,
        "code": error.code,
        "msg": error.message,
    }
    if error.details:
        document["details"] = error.details
    return dumps(document)


def version_json() -> str:
    return dumps({"cniVersion": CURRENT_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)})


class _Decoding:
    """What the C scanner reads of a decoder: ``json.loads``'s defaults."""

    strict = True
    object_hook = object_pairs_hook = array_hook = None
    parse_float, parse_int, parse_constant = float, int, float  # float("NaN"), float("-Infinity")


_scan = _json.make_scanner(_Decoding())  # type: ignore[arg-type]


def _unencodable(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_encode = _json.make_encoder({}, _unencodable, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True)
_WHITESPACE = " \t\n\r"


def loads(text: bytes | str) -> object:
    """``json.loads``: the same values, the same errors."""
    try:
        stripped = (text.decode("utf-8") if isinstance(text, bytes) else text).strip(_WHITESPACE)
        value, end = _scan(stripped, 0)
        if end == len(stripped):
            return value
    except (StopIteration, ValueError):  # UnicodeDecodeError is a ValueError: json also reads UTF-16 and -32
        pass
    import json  # noqa: PLC0415 (its error message, or whatever the scanner alone does not take)

    return json.loads(text)


def dumps(value: object) -> str:
    """``json.dumps`` of a document made of dicts, lists, strings, numbers, booleans and None."""
    return "".join(_encode(value, 0))
