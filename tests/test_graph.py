"""The plan as a Mermaid flowchart and as Graphviz DOT: structure, quoting, and what each plan shows."""

from __future__ import annotations

import re
import shutil
import subprocess
from ipaddress import IPv4Address
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from istio_iptables.capture.config import ALL, Config, Mode
from istio_iptables.capture.model import Family, Plan
from istio_iptables.capture.plan import HostFacts, build_plan
from istio_iptables.explain.graph import _dot_text, _mermaid_text, render_graph, short_match
from tests.test_properties import configs_and_facts

INJECTION: dict[str, Any] = {
    "proxy_uids": (1337,),
    "service_cidrs": ALL,
    "inbound_ports": ALL,
    "local_exclude_ports": (15090, 15021, 15020),
    "ipv6": False,
}


def plan_of(**overrides: Any) -> Plan:
    return build_plan(Config(**{**INJECTION, **overrides}), HostFacts())


PLANS = {
    "redirect": plan_of(),
    "tproxy": plan_of(mode=Mode.TPROXY),
    "dns": plan_of(redirect_dns=True, dns_servers=(IPv4Address("10.96.0.10"),)),
    "everything": plan_of(
        mode=Mode.TPROXY,
        redirect_dns=True,
        capture_all_dns=True,
        drop_invalid=True,
        kube_virt_interfaces=("eth1",),
        exclude_interfaces=("eth2",),
        owner_groups_include=("java", 202),
        ipv6=True,
    ),
    "empty": plan_of(inbound_ports=(), service_cidrs=()),
}

# ---- Mermaid ---------------------------------------------------------------------------------------------

_ID = r"[A-Za-z][A-Za-z0-9_]*"
_QUOTED = r'"[^"]*"'
_NODE = re.compile(rf"^ *({_ID})(\(\[|\[\[|\{{\{{|\(\(|\[/|\[|\()({_QUOTED})(\]\)|\]\]|\}}\}}|\)\)|/\]|\]|\))$")
_EDGE = re.compile(rf"^  ({_ID}) (-->|==>|-\.->)(?:\|({_QUOTED})\|)? ({_ID})$")
_SHAPES = {"([": "])", "[[": "]]", "{{": "}}", "((": "))", "[/": "/]", "[": "]", "(": ")"}


def check_mermaid(text: str) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """Every line is a known statement; subgraphs balance; edges join declared nodes. Returns the node labels
    and the edges (source, label, target)."""
    lines = text.splitlines()
    assert lines[0] == "flowchart LR"
    nodes: dict[str, str] = {}
    edges: list[tuple[str, str, str]] = []
    depth = 0
    for line in lines[1:]:
        if node := _NODE.match(line):
            identifier, opening, label, closing = node.groups()
            assert _SHAPES[opening] == closing, line
            assert identifier not in nodes, f"node {identifier} twice"
            nodes[identifier] = label[1:-1]
        elif re.fullmatch(rf" *subgraph {_ID}\[{_QUOTED}\]", line):
            depth += 1
        elif line.strip() == "end":
            depth -= 1
            assert depth >= 0
        elif edge := _EDGE.match(line):
            source, _, label, target = edge.groups()
            edges.append((source, (label or '""')[1:-1], target))
        elif re.fullmatch(rf"  classDef {_ID} [a-z:#0-9,-]+", line):
            pass
        elif class_line := re.fullmatch(rf"  class ((?:{_ID},)*{_ID}) {_ID}", line):
            assert all(member in nodes for member in class_line[1].split(","))
        else:
            raise AssertionError(f"not a statement: {line!r}")
    assert depth == 0
    for source, _, target in edges:
        assert source in nodes and target in nodes, (source, target)
    assert "end" not in {identifier.lower() for identifier in nodes}
    return nodes, edges


@pytest.mark.parametrize("name", PLANS)
def test_mermaid_structure(name: str) -> None:
    check_mermaid(render_graph(PLANS[name], "mermaid"))


def labelled(edges: list[tuple[str, str, str]], nodes: dict[str, str]) -> set[tuple[str, str, str]]:
    return {(nodes[source], label, nodes[target]) for source, label, target in edges}


def test_mermaid_default_injection() -> None:
    nodes, edges = check_mermaid(render_graph(PLANS["redirect"], "mermaid"))
    shown = labelled(edges, nodes)
    assert ("OUTPUT hook: sent by the pod", "then", "nat OUTPUT") in shown
    assert ("PREROUTING hook: arriving at the pod", "then", "nat PREROUTING") in shown
    assert ("nat OUTPUT", "1: all", "nat ISTIO_OUTPUT") in shown
    assert ("nat ISTIO_OUTPUT", "9: all", "nat ISTIO_REDIRECT") in shown
    assert ("nat ISTIO_REDIRECT", "1: tcp", "REDIRECT :15001") in shown
    assert ("nat ISTIO_IN_REDIRECT", "1: tcp", "REDIRECT :15006") in shown
    assert (
        "nat ISTIO_OUTPUT",
        "2: out lo ! dst 127.0.0.1/32 tcp ! dport 15008 uid 1337<br/>"
        "5: out lo ! dst 127.0.0.1/32 tcp ! dport 15008 gid 1337",
        "nat ISTIO_IN_REDIRECT",
    ) in shown
    # The RETURN rules of a chain share one edge, one line per rule, in kernel order.
    returns = next(
        label for source, label, target in shown if (source, target) == ("nat ISTIO_OUTPUT", "RETURN to the caller")
    )
    assert [line.split(":")[0] for line in returns.split("<br/>")] == ["1", "3", "4", "6", "7", "8"]
    assert "8: dst 127.0.0.1/32" in returns
    assert ("nat ISTIO_INBOUND", "5: tcp", "nat ISTIO_IN_REDIRECT") in shown


def test_mermaid_tproxy() -> None:
    nodes, edges = check_mermaid(render_graph(PLANS["tproxy"], "mermaid"))
    shown = labelled(edges, nodes)
    assert ("mangle ISTIO_TPROXY", "1: ! dst 127.0.0.1/32 tcp", "TPROXY :15006 mark 1337") in shown
    assert ("mangle ISTIO_INBOUND", "7: tcp ctstate RELATED,ESTABLISHED", "mangle ISTIO_DIVERT") in shown
    assert ("mangle ISTIO_DIVERT", "1: all", "MARK set 1337") in shown
    assert ("mangle ISTIO_DIVERT", "2: all", "ACCEPT: out of the table") in shown
    # The inserts are rules 1 to 3 in the kernel.
    inbound_returns = next(
        label for source, label, target in shown if (source, target) == ("mangle ISTIO_INBOUND", "RETURN to the caller")
    )
    assert inbound_returns.split("<br/>")[:3] == [
        "1: tcp mark 1337",
        "2: tcp src 127.0.0.6/32 in lo",
        "3: tcp in lo ! mark 1338",
    ]
    assert ("mangle OUTPUT", "1: tcp out lo mark 1337", "RETURN: out of the table") in shown
    assert ("mangle PREROUTING", "then", "nat PREROUTING") not in shown  # nat PREROUTING holds nothing
    assert ("PREROUTING hook: arriving at the pod", "then", "mangle PREROUTING") in shown
    assert ("mangle OUTPUT", "then", "nat OUTPUT") in shown


def test_mermaid_dns_zones_and_table_order() -> None:
    nodes, edges = check_mermaid(render_graph(PLANS["dns"], "mermaid"))
    shown = labelled(edges, nodes)
    assert ("OUTPUT hook: sent by the pod", "then", "raw OUTPUT") in shown
    assert ("raw OUTPUT", "then", "nat OUTPUT") in shown
    assert ("raw ISTIO_INBOUND", "1: udp sport 53 src 10.96.0.10/32", "CT zone 1") in shown
    assert (
        "nat ISTIO_OUTPUT_DNS",
        "1: tcp dport 53 dst 10.96.0.10/32<br/>2: udp dport 53 dst 10.96.0.10/32",
        "REDIRECT :15053",
    ) in shown
    assert "-.->" in render_graph(PLANS["dns"], "mermaid")  # CT is not terminal: a dashed edge


def test_mermaid_everything_dual_stack() -> None:
    text = render_graph(PLANS["everything"], "mermaid")
    nodes, edges = check_mermaid(text)
    assert 'subgraph cluster_ipv4["IPv4"]' in text and 'subgraph cluster_ipv6["IPv6"]' in text
    shown = labelled(edges, nodes)
    assert ("mangle ISTIO_DROP", "1: all", "DROP") in shown
    assert ("mangle PREROUTING", "1: in eth2", "RETURN: out of the table") in shown
    assert ("nat PREROUTING", "1: in eth1", "nat ISTIO_REDIRECT") in shown
    returns = [
        label for source, label, target in shown if (source, target) == ("nat ISTIO_OUTPUT", "RETURN to the caller")
    ]
    assert len(returns) == 2  # one per family
    assert all("<br/>8: ! gid java ! gid 202<br/>" in label for label in returns)
    assert any(label == "mangle ISTIO_TPROXY" for label in nodes.values())
    assert sum(1 for label in nodes.values() if label == "TPROXY :15006 mark 1337") == 2  # one per family
    only_v6 = render_graph(PLANS["everything"], "mermaid", family=Family.V6)
    assert "cluster_ipv4" not in only_v6 and "::1/128" in only_v6


def test_mermaid_empty_plan() -> None:
    nodes, edges = check_mermaid(render_graph(PLANS["empty"], "mermaid"))
    shown = labelled(edges, nodes)
    returns = next(
        label for source, label, target in shown if (source, target) == ("nat ISTIO_OUTPUT", "RETURN to the caller")
    )
    assert returns.split("<br/>")[-1] == "8: dst 127.0.0.1/32"
    assert not any(target == "nat ISTIO_REDIRECT" for _, _, target in shown if _ == "nat ISTIO_OUTPUT")
    assert not any(label == "nat PREROUTING" for label in nodes.values())


def test_quoting() -> None:
    assert _mermaid_text('a "b" <c> | d & e') == '"a #quot;b#quot; #lt;c#gt; #124; d #amp; e"'
    assert _dot_text('a "b" \\ c\nd') == '"a \\"b\\" \\\\ c\\nd"'


def test_long_matches_are_shortened() -> None:
    plan = plan_of(owner_groups_include=tuple(f"group{index}" for index in range(20)))
    rule = next(rule for rule in plan.rulesets[0].rules if len(rule.clauses) == 20)
    label = short_match(rule.clauses)
    assert len(label) == 64 and label.endswith("…")
    assert short_match(()) == "all"


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown graph format"):
        render_graph(PLANS["redirect"], "svg")  # type: ignore[arg-type]


# ---- DOT -------------------------------------------------------------------------------------------------

_DOT_STATEMENT = re.compile(
    r'^ *(?:"[^"\\]*(?:\\.[^"\\]*)*"(?: -> "[^"\\]*(?:\\.[^"\\]*)*")? \[.*\];'
    r'|subgraph "[^"]+" \{|label="[^"\\]*(?:\\.[^"\\]*)*";|\}|rankdir=LR;|(?:node|edge) \[.*\];)$'
)


def check_dot(text: str) -> None:
    lines = text.splitlines()
    assert lines[0] == "digraph capture {" and lines[-1] == "}"
    depth = 0
    for line in lines:
        depth += line.count("{") - line.count("}") if not line.strip().startswith('"') else 0
        if line not in (lines[0], lines[-1]):
            assert _DOT_STATEMENT.match(line), line
    assert depth == 0


DOT = shutil.which("dot")


def graphviz_accepts(text: str) -> None:
    if DOT is None:
        return
    result = subprocess.run([DOT, "-Tsvg"], input=text, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "<svg" in result.stdout
    assert "Warning" not in result.stderr, result.stderr


@pytest.mark.parametrize("name", PLANS)
def test_dot_structure(name: str) -> None:
    text = render_graph(PLANS[name], "dot")
    check_dot(text)
    graphviz_accepts(text)


def test_dot_content() -> None:
    text = render_graph(PLANS["tproxy"], "dot")
    assert (
        '"ipv4_mangle_ISTIO_TPROXY" -> "ipv4_mangle_TPROXY_15006_1337" '
        '[style=solid, label="1: ! dst 127.0.0.1/32 tcp"];' in text
    )
    assert 'subgraph "cluster_ipv4_mangle" {' in text
    assert '"ipv4_mangle_ISTIO_DIVERT" -> "ipv4_mangle_MARK_1337" [style=dashed, label="1: all"];' in text
    assert '[label="TPROXY :15006 mark 1337", shape=hexagon' in text


@pytest.mark.skipif(DOT is None, reason="graphviz (dot) is not installed: apt-get install graphviz")
def test_graphviz_renders_the_dual_stack_plan() -> None:
    graphviz_accepts(render_graph(PLANS["everything"], "dot"))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs_and_facts())
def test_graphs_of_random_plans_are_well_formed(case: Any) -> None:
    plan = build_plan(*case)
    check_mermaid(render_graph(plan, "mermaid"))
    dot = render_graph(plan, "dot")
    check_dot(dot)
    graphviz_accepts(dot)
