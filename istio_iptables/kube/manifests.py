"""The ``inject`` command's files: manifests, values and mesh config read as YAML (or JSON), the injected
manifests written only once every workload has been injected, so a refused one leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from istio_iptables.errors import ConfigError
from istio_iptables.kube.capture import load_settings
from istio_iptables.kube.inject import DEFAULT_IMAGE, Injector, check_config, explained_documents
from istio_iptables.kube.settings import DEFAULT_VALUES
from istio_iptables.kube.template import SHIPPED, InjectorConfig, parse_config, shipped_text
from istio_iptables.log import Log

log = Log(__name__)


def run_inject(
    source: str,
    *,
    output: str,
    sets: Sequence[str],
    values_file: str,
    mesh_file: str,
    image: str,
    hardened: bool,
    injector_config: str = "",
    capture_only: bool = False,
    namespace_labels: str = "",
    explain: bool = False,
) -> None:
    """``istio-iptables inject``: ``source`` (``-`` for stdin) injected to ``output`` (empty for stdout);
    with ``explain``, why each workload was or was not injected, on stderr."""
    injector = load_injector(
        sets=sets,
        values_file=values_file,
        mesh_file=mesh_file,
        image=image,
        hardened=hardened,
        injector_config=injector_config,
        capture_only=capture_only,
        namespace_labels=namespace_labels,
    )
    text = _read(source, "-f/--filename")
    documents = load_documents(text, "standard input" if source == "-" else source)
    injected, reasons = explained_documents(documents, injector)
    if explain:
        sys.stderr.write("".join(f"{reason}\n" for reason in reasons))
    else:
        # Each workload left as it was is said (at warning level: inject's log shows nothing below it).
        for reason in reasons:
            workload, _, why = reason.partition(": not injected: ")
            if why:
                log.warning("skipped %s: %s", workload, why)
    rendered = dump_documents(injected)
    if output:
        _write_whole(output, rendered)
    else:
        sys.stdout.write(rendered)


def load_injector(
    *,
    sets: Sequence[str],
    values_file: str,
    mesh_file: str,
    image: str,
    hardened: bool,
    injector_config: str = "",
    capture_only: bool = False,
    namespace_labels: str = "",
) -> Injector:
    """The injector that the options shared by ``inject`` and ``webhook`` describe (files read here)."""
    config, config_values = read_injector_config(injector_config) if injector_config else (None, None)
    settings = load_settings(
        sets,
        values=read_tree(values_file, "--values", configmap_key="values") if values_file else config_values,
        mesh_config=read_tree(mesh_file, "--mesh-config", configmap_key="mesh") if mesh_file else None,
    )
    if config is not None:
        check_config(config, settings)
    if image and (not image.strip() or any(character.isspace() for character in image)):
        raise ConfigError(f"invalid value for --image: '{image}': must be an image reference without blanks")
    configured = settings.text("global.proxy_init.image")
    if "/" not in configured and configured != DEFAULT_VALUES["global"]["proxy_init"]["image"]:
        # Istio combines a bare name with its hub and tag, which name Istio's images, not this project's.
        log.warning(
            "values.global.proxy_init.image '%s' is ignored: it names no registry path (no '/'); the init "
            "container's image is %s (--image)",
            configured,
            image or DEFAULT_IMAGE,
        )
    return Injector(
        settings=settings,
        image=image or DEFAULT_IMAGE,
        hardened=hardened,
        config=config,
        capture_only=capture_only,
        namespace_labels=_labels(namespace_labels) if namespace_labels else None,
    )


def read_injector_config(source: str) -> tuple[InjectorConfig, Mapping[str, Any] | None]:
    """``--injector-config``: a shipped configuration by name (istio, relay) or a file holding the injector's
    ConfigMap (its ``config`` key, and its ``values`` key when present) or the ``config`` tree itself."""
    flag = "--injector-config"
    text = shipped_text(source) if source in SHIPPED else _read(source, flag)
    documents = load_documents(text, source)
    if len(documents) != 1 or not isinstance(documents[0], Mapping):
        raise ConfigError(f"invalid value for {flag}: '{source}': must hold one ConfigMap or one configuration map")
    tree: Mapping[str, Any] = documents[0]
    values = None
    if tree.get("kind") == "ConfigMap":
        data = tree.get("data") or {}
        if not isinstance(data.get("config"), str):
            raise ConfigError(f"invalid value for {flag}: '{source}': a ConfigMap without data.config")
        inner = load_documents(data["config"], f"{source} (data.config)")
        if len(inner) != 1:
            raise ConfigError(f"invalid value for {flag}: '{source}': data.config must hold one map")
        if isinstance(data.get("values"), str):
            values = read_tree_text(data["values"], f"{source} (data.values)", flag)
        tree = inner[0]
    return parse_config(json.loads(json.dumps(tree, default=str)), f"{flag} {source}"), values


def _labels(text: str) -> dict[str, str]:
    labels = {}
    for item in text.split(","):
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ConfigError(
                f"invalid value for --namespace-labels: '{text}': must be KEY=VALUE[,KEY=VALUE...] "
                "(e.g. istio-injection=enabled)"
            )
        labels[key.strip()] = value.strip()
    return labels


def load_documents(text: str, source: str) -> list[Any]:
    """The documents of a multi-document YAML (or JSON) text; empty documents dropped."""
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {_where(error)}") from None
    return [document for document in documents if document is not None]


def dump_documents(documents: Sequence[Any]) -> str:
    """The documents as YAML that kubectl reads back the same: every string that a YAML 1.1 reader would take
    for something else is quoted (_KubectlSafeDumper)."""
    return yaml.dump_all(
        documents, Dumper=_KubectlSafeDumper, sort_keys=False, default_flow_style=False, allow_unicode=True
    )


class _KubectlSafeDumper(yaml.SafeDumper):
    """PyYAML's safe dumper quotes the strings that its own YAML 1.1 resolver would read as another type. The
    reader kubectl and client-go use (sigs.k8s.io/yaml, a go-yaml v2) resolves more plain scalars: ``y`` and
    ``n`` as booleans, and numbers as Go's parsers take them (``1e3``, ``0o17``, ``0999``, ``1_0``, ``.5``).
    Such a string is written quoted, as a string is that PyYAML itself would misread."""

    def resolve(self, kind: type[yaml.Node], value: Any, implicit: tuple[bool, bool]) -> str:
        tag: str = super().resolve(kind, value, implicit)  # type: ignore[no-untyped-call]
        if kind is yaml.ScalarNode and implicit[0] and tag == _STRING and _go_yaml_reads_as_non_string(value):
            return _NOT_A_STRING
        return tag


_STRING = "tag:yaml.org,2002:str"
_NOT_A_STRING = "tag:yaml.org,2002:go-yaml-v2-non-string"
"""Any tag but the string's makes the emitter quote the scalar (an implicit string cannot be plain)."""

_GO_YAML_WORDS = frozenset(
    {
        *("y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"),
        *("n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"),
        *("", "~", "null", "Null", "NULL", "<<"),
        *(".nan", ".NaN", ".NAN", ".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF", "-.inf", "-.Inf", "-.INF"),
    }
)
"""go-yaml v2's resolve table (resolve.go): the words it reads as booleans, null, a merge key or a float."""
_GO_INTEGER = re.compile(r"[-+]?(0[xX][0-9a-fA-F]+|0[oO][0-7]+|0[bB][01]+|0[0-7]*|[1-9][0-9]*)")
"""Go's strconv.ParseInt/ParseUint in base 0, which go-yaml v2 applies once every ``_`` is removed."""
_GO_YAML_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
"""go-yaml v2's yamlStyleFloat, also applied once every ``_`` is removed."""
_DOT_FLOAT = re.compile(r"\.[0-9]+([eE][-+]?[0-9]+)?")
"""A plain scalar starting with ``.``: go-yaml v2 tries strconv.ParseFloat on it as it is."""
_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}([Tt ].*)?")


def _go_yaml_reads_as_non_string(value: str) -> bool:
    """Whether go-yaml v2 reads the plain scalar ``value`` as anything but a string (resolve.go's resolve)."""
    if value in _GO_YAML_WORDS:
        return True
    if value[:1] == ".":
        return _DOT_FLOAT.fullmatch(value) is not None
    if value[:1] not in tuple("+-0123456789"):
        return False
    plain = value.replace("_", "")
    return any(pattern.fullmatch(plain) for pattern in (_GO_INTEGER, _GO_YAML_FLOAT, _TIMESTAMP))


def read_tree(path: str, flag: str, *, configmap_key: str) -> Mapping[str, Any]:
    """A settings tree from a YAML or JSON file: the tree itself, or an Istio ConfigMap holding it under
    ``data.<configmap_key>`` (``istio-sidecar-injector``'s ``values``, ``istio``'s ``mesh``)."""
    tree = read_tree_text(_read(path, flag), path, flag)
    if tree.get("kind") == "ConfigMap":
        held = (tree.get("data") or {}).get(configmap_key)
        if not isinstance(held, str):
            raise ConfigError(f"invalid value for {flag}: '{path}': a ConfigMap without data.{configmap_key}")
        inner = load_documents(held, f"{path} (data.{configmap_key})")
        if len(inner) != 1 or not isinstance(inner[0], Mapping):
            raise ConfigError(f"invalid value for {flag}: '{path}': data.{configmap_key} must hold one map")
        tree = inner[0]
    plain: Mapping[str, Any] = json.loads(json.dumps(tree, default=str))  # no dates or other YAML-only types
    return plain


def read_tree_text(text: str, path: str, flag: str) -> Mapping[str, Any]:
    documents = load_documents(text, path)
    if len(documents) != 1 or not isinstance(documents[0], Mapping):
        raise ConfigError(f"invalid value for {flag}: '{path}': must hold one map of settings")
    tree: Mapping[str, Any] = documents[0]
    return tree


def _read(path: str, flag: str) -> str:
    try:
        if path == "-":
            return sys.stdin.read()
        with open(path, encoding="utf-8") as file:
            return file.read()
    except OSError as error:
        raise ConfigError(f"invalid value for {flag}: '{path}': {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"invalid value for {flag}: '{path}': not UTF-8 text") from None


def _write_whole(path: str, text: str) -> None:
    """``text`` in ``path`` all at once: written beside it, then renamed over it."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=".inject-")
    except OSError as error:
        raise ConfigError(f"invalid value for -o/--output: '{path}': {error.strerror}") from None
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # as open() would have made it, not mkstemp's 0600
        os.replace(temporary, path)
    except OSError as error:
        os.unlink(temporary)
        raise ConfigError(f"invalid value for -o/--output: '{path}': {error.strerror}") from None


def _where(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem
