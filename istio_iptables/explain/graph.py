"""The plan as a graph: Mermaid flowchart or Graphviz DOT.

Per family: the two hooks (OUTPUT for what the pod sends, PREROUTING for what arrives), each running through
the tables that hold rules for it in netfilter's order (raw, mangle, nat: dotted "then" edges); every chain
as a node; every jump as an edge labelled with its rule number and a short form of its match; every other
target as a node: the captures (REDIRECT :15001, TPROXY :15006 mark 1337), RETURN (back to the calling
chain, or out of the table from a built-in chain), ACCEPT, DROP, and the non-terminal marks (MARK, CONNMARK,
CT zone, dashed edges: the packet goes on to the next rule). Rules between the same two nodes share one edge,
one line per rule. Rule numbers are the kernel's (after the ``-I`` inserts).
"""

from __future__ import annotations

import re
from typing import Literal

from istio_iptables.capture.model import (
    BUILTIN_CHAINS,
    Connmark,
    ConntrackState,
    CtZone,
    Destination,
    DestinationPort,
    DestinationPorts,
    Family,
    GidOwner,
    InInterface,
    InSet,
    Jump,
    Mark,
    Match,
    OutInterface,
    Plan,
    Protocol,
    Redirect,
    RestoreMark,
    Rule,
    SaveMark,
    SetMark,
    Source,
    SourcePort,
    Table,
    Target,
    Tproxy,
    UidOwner,
    Verdict,
)
from istio_iptables.explain.trace import kernel_chains
from istio_iptables.records import field, mutable_record
from istio_iptables.state import tables_holding

GraphFormat = Literal["mermaid", "dot"]
FORMATS: tuple[GraphFormat, ...] = ("mermaid", "dot")
HOOKS = {"OUTPUT": "OUTPUT hook: sent by the pod", "PREROUTING": "PREROUTING hook: arriving at the pod"}
TABLE_ORDER = (Table.RAW, Table.MANGLE, Table.NAT)
MAX_LABEL = 64

Kind = Literal["hook", "builtin", "chain", "capture", "return", "accept", "drop", "mark"]
Style = Literal["jump", "then", "continue"]


@mutable_record
class _Node:
    id: str
    label: str
    kind: Kind
    cluster: tuple[str, ...]
    """Family, then table (empty for a hook)."""


@mutable_record
class _Edge:
    source: str
    target: str
    style: Style
    labels: list[str] = field(default_factory=list)


@mutable_record
class _Graph:
    nodes: dict[str, _Node] = field(default_factory=dict)
    edges: dict[tuple[str, str, Style], _Edge] = field(default_factory=dict)
    clusters: dict[tuple[str, ...], str] = field(default_factory=dict)
    """Cluster path → label, in order of appearance."""

    def node(self, id: str, label: str, kind: Kind, cluster: tuple[str, ...]) -> str:
        if id not in self.nodes:
            self.nodes[id] = _Node(id, label, kind, cluster)
        return id

    def edge(self, source: str, target: str, style: Style, label: str = "") -> None:
        edge = self.edges.setdefault((source, target, style), _Edge(source, target, style))
        if label:
            edge.labels.append(label)


def render_graph(plan: Plan, fmt: GraphFormat = "mermaid", *, family: Family | None = None) -> str:
    """Every family of the plan (or only ``family``) as a Mermaid flowchart or a Graphviz digraph."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown graph format {fmt!r}: choose one of {', '.join(FORMATS)}")
    graph = _Graph()
    for ruleset in plan.rulesets:
        if family is None or ruleset.family is family:
            _add_family(graph, ruleset.family, ruleset.rules)
    return _mermaid(graph) if fmt == "mermaid" else _dot(graph)


def _ident(*parts: str) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9]", "_", part) for part in parts)


def _add_family(graph: _Graph, family: Family, rules: tuple[Rule, ...]) -> None:
    prefix = family.label
    graph.clusters[(prefix,)] = f"IPv{family.value}"
    tables = {table: kernel_chains(state) for table, state in tables_holding(rules).items()}
    for hook, label in HOOKS.items():
        previous = ""
        for table in TABLE_ORDER:
            if not tables.get(table, {}).get(hook):
                continue
            if not previous:
                previous = graph.node(_ident(prefix, "hook", hook), label, "hook", (prefix,))
            chain = _chain_node(graph, prefix, table, hook)
            graph.edge(previous, chain, "then", "then")
            previous = chain
    for table in sorted(tables, key=lambda table: table.value):
        for chain, entries in tables[table].items():
            source = _chain_node(graph, prefix, table, chain)
            for number, entry in enumerate(entries, 1):
                assert entry.rule is not None
                label = f"{number}: {short_match(entry.rule.clauses)}"
                target, style = _target_node(graph, prefix, table, chain, entry.rule.target)
                graph.edge(source, target, style, label)


def _chain_node(graph: _Graph, prefix: str, table: Table, chain: str) -> str:
    graph.clusters.setdefault((prefix, table.value), table.value)
    kind: Kind = "builtin" if chain in BUILTIN_CHAINS else "chain"
    return graph.node(_ident(prefix, table.value, chain), f"{table.value} {chain}", kind, (prefix, table.value))


def _target_node(graph: _Graph, prefix: str, table: Table, chain: str, target: Target) -> tuple[str, Style]:
    cluster = (prefix, table.value)
    if isinstance(target, Jump):
        return _chain_node(graph, prefix, table, target.chain), "jump"
    if target is Verdict.RETURN:
        label = "RETURN: out of the table" if chain in BUILTIN_CHAINS else "RETURN to the caller"
        return graph.node(_ident(prefix, table.value, chain, "RETURN"), label, "return", cluster), "jump"
    if target is Verdict.ACCEPT:
        return graph.node(_ident(prefix, table.value, "ACCEPT"), "ACCEPT: out of the table", "accept", cluster), "jump"
    if target is Verdict.DROP:
        return graph.node(_ident(prefix, table.value, "DROP"), "DROP", "drop", cluster), "jump"
    if isinstance(target, Redirect):
        node = _ident(prefix, table.value, "REDIRECT", str(target.port))
        return graph.node(node, f"REDIRECT :{target.port}", "capture", cluster), "jump"
    if isinstance(target, Tproxy):
        mask = "" if target.mask == 0xFFFFFFFF else f"/{target.mask:#x}"
        node = _ident(prefix, table.value, "TPROXY", str(target.port), f"{target.mark}{mask}")
        return graph.node(node, f"TPROXY :{target.port} mark {target.mark}{mask}", "capture", cluster), "jump"
    if isinstance(target, SetMark):
        label, key = f"MARK set {target.mark}", f"MARK_{target.mark}"
    elif isinstance(target, SaveMark):
        label, key = "CONNMARK save: connmark = mark", "CONNMARK_save"
    elif isinstance(target, RestoreMark):
        label, key = "CONNMARK restore: mark = connmark", "CONNMARK_restore"
    else:
        assert isinstance(target, CtZone)
        label, key = f"CT zone {target.zone}", f"CT_{target.zone}"
    return graph.node(_ident(prefix, table.value, key), label, "mark", cluster), "continue"


def short_match(clauses: tuple[Match, ...]) -> str:
    """The match in few words: ``out lo ! dst 127.0.0.1/32 tcp ! dport 15008 uid 1337``; ``all`` if none."""
    words = " ".join(_short_clause(clause) for clause in clauses) or "all"
    return words if len(words) <= MAX_LABEL else words[: MAX_LABEL - 1] + "…"


def _short_clause(clause: Match) -> str:
    bang = "! " if clause.negated else ""
    if isinstance(clause, Protocol):
        return f"{bang}{clause.protocol.value}"
    if isinstance(clause, Source):
        return f"{bang}src {clause.network}"
    if isinstance(clause, Destination):
        return f"{bang}dst {clause.network}"
    if isinstance(clause, InInterface):
        return f"{bang}in {clause.name}"
    if isinstance(clause, OutInterface):
        return f"{bang}out {clause.name}"
    if isinstance(clause, DestinationPort):
        return f"{bang}dport {clause.port}"
    if isinstance(clause, SourcePort):
        return f"{bang}sport {clause.port}"
    if isinstance(clause, DestinationPorts):
        return f"{bang}dports {','.join(map(str, clause.ports))}"
    if isinstance(clause, UidOwner):
        return f"{bang}uid {clause.uid}"
    if isinstance(clause, GidOwner):
        return f"{bang}gid {clause.group}"
    if isinstance(clause, Mark):
        return f"{bang}mark {clause.mark}"
    if isinstance(clause, ConntrackState):
        return f"{bang}ctstate {','.join(state.value for state in clause.states)}"
    if isinstance(clause, InSet):
        return f"{bang}in set {clause.name}"
    assert isinstance(clause, Connmark)
    return f"{bang}connmark {clause.mark}"


# ---- Mermaid -------------------------------------------------------------------------------------------

_MERMAID_SHAPES: dict[Kind, tuple[str, str]] = {
    "hook": ("([", "])"),
    "builtin": ("[[", "]]"),
    "chain": ("[", "]"),
    "capture": ("{{", "}}"),
    "return": ("(", ")"),
    "accept": ("(", ")"),
    "drop": ("((", "))"),
    "mark": ("[/", "/]"),
}
_MERMAID_ARROWS: dict[Style, str] = {"jump": "-->", "then": "==>", "continue": "-.->"}
_MERMAID_CLASSES = {
    "capture": "fill:#d8f3dc,stroke:#2d6a4f",
    "drop": "fill:#f8d7da,stroke:#842029",
    "return": "fill:#eeeeee,stroke:#666666",
    "accept": "fill:#eeeeee,stroke:#666666",
    "mark": "fill:#fff3cd,stroke:#997404",
    "hook": "fill:#cfe2ff,stroke:#084298",
}


def _mermaid_text(text: str) -> str:
    """A quoted Mermaid string: its quote and the characters its parser reads as markup, as entities."""
    for character, entity in (("&", "#amp;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;"), ("|", "#124;")):
        text = text.replace(character, entity)
    return f'"{text}"'


def _mermaid(graph: _Graph) -> str:
    lines = ["flowchart LR"]

    def emit(path: tuple[str, ...], depth: int) -> None:
        indent = "  " * depth
        for node in graph.nodes.values():
            if node.cluster == path:
                opening, closing = _MERMAID_SHAPES[node.kind]
                lines.append(f"{indent}{node.id}{opening}{_mermaid_text(node.label)}{closing}")
        for child, label in graph.clusters.items():
            if len(child) == len(path) + 1 and child[: len(path)] == path:
                lines.append(f"{indent}subgraph {_ident('cluster', *child)}[{_mermaid_text(label)}]")
                emit(child, depth + 1)
                lines.append(f"{indent}end")

    emit((), 1)
    for edge in graph.edges.values():
        label = "<br/>".join(_mermaid_text(line)[1:-1] for line in edge.labels)
        arrow = _MERMAID_ARROWS[edge.style]
        middle = f'{arrow}|"{label}"|' if label else arrow
        lines.append(f"  {edge.source} {middle} {edge.target}")
    for kind, style in _MERMAID_CLASSES.items():
        members = [node.id for node in graph.nodes.values() if node.kind == kind]
        if members:
            lines.append(f"  classDef {kind} {style}")
            lines.append(f"  class {','.join(members)} {kind}")
    return "\n".join(lines) + "\n"


# ---- Graphviz DOT --------------------------------------------------------------------------------------

_DOT_SHAPES: dict[Kind, str] = {
    "hook": 'shape=oval, style=filled, fillcolor="#cfe2ff"',
    "builtin": "shape=box, peripheries=2",
    "chain": "shape=box",
    "capture": 'shape=hexagon, style=filled, fillcolor="#d8f3dc"',
    "return": 'shape=box, style="rounded,filled", fillcolor="#eeeeee"',
    "accept": 'shape=box, style="rounded,filled", fillcolor="#eeeeee"',
    "drop": 'shape=octagon, style=filled, fillcolor="#f8d7da"',
    "mark": 'shape=parallelogram, style=filled, fillcolor="#fff3cd"',
}
_DOT_EDGES: dict[Style, str] = {"jump": "style=solid", "then": "style=bold", "continue": "style=dashed"}


def _dot_text(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _dot(graph: _Graph) -> str:
    lines = [
        "digraph capture {",
        "  rankdir=LR;",
        '  node [fontname="Helvetica", fontsize=11];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]

    def emit(path: tuple[str, ...], depth: int) -> None:
        indent = "  " * depth
        for node in graph.nodes.values():
            if node.cluster == path:
                lines.append(f"{indent}{_dot_text(node.id)} [label={_dot_text(node.label)}, {_DOT_SHAPES[node.kind]}];")
        for child, label in graph.clusters.items():
            if len(child) == len(path) + 1 and child[: len(path)] == path:
                lines.append(f"{indent}subgraph {_dot_text(_ident('cluster', *child))} {{")
                lines.append(f"{indent}  label={_dot_text(label)};")
                emit(child, depth + 1)
                lines.append(f"{indent}}}")

    emit((), 1)
    for edge in graph.edges.values():
        attributes = [_DOT_EDGES[edge.style]]
        if edge.labels:
            attributes.append(f"label={_dot_text(chr(10).join(edge.labels))}")
        lines.append(f"  {_dot_text(edge.source)} -> {_dot_text(edge.target)} [{', '.join(attributes)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"
