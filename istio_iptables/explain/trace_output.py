"""A trace for people (a step list) and for programs (JSON)."""

from __future__ import annotations

import json

from istio_iptables.explain.trace import Event, Flow, Location, Note, Outcome, Step, Trace, TraceVerdict

TYPE_CHECKING = False  # typing is not imported at run time (records.py says why)
if TYPE_CHECKING:
    from typing import Any

_SYMBOL = {Outcome.MATCHED: "+", Outcome.NOT_MATCHED: "-", Outcome.UNKNOWN: "?"}
_INDENT = "  "


def render_trace_text(trace: Trace) -> str:
    """The flow, the verdict, then every rule checked, grouped by hook and table, indented by call depth::

    OUTPUT: nat
      + 1  -A OUTPUT -j ISTIO_OUTPUT  [jump to ISTIO_OUTPUT]
        - 1  -A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN  [no: -o lo]
    """
    lines = [
        f"flow:    {trace.flow.describe()} ({trace.family.label})",
        *(f"assumed: {assumption}" for assumption in trace.assumed),
        f"verdict: {trace.verdict.text}",
        *(f"not walked: {rules}" for rules in trace.not_walked),
    ]
    if trace.events:
        lines.append("(+ matched, - not matched, ? could not interpret)")
    heading: tuple[str, bool, str] | None = None
    for event in trace.events:
        table = event.at.table if isinstance(event, Step) else event.table
        hook = event.at.hook if isinstance(event, Step) else event.hook
        looped = event.at.looped_back if isinstance(event, Step) else event.looped_back
        if heading != (hook, looped, table.value):
            heading = (hook, looped, table.value)
            lines.append("")
            lines.append(f"{hook}{' (back in over lo)' if looped else ''}: {table.value}")
        lines.append(_event_line(event))
    return "\n".join(lines) + "\n"


def _event_line(event: Event) -> str:
    indent = _INDENT * (event.depth + 1)
    if isinstance(event, Note):
        return f"{indent}. {event.text}"
    if event.outcome is Outcome.MATCHED:
        detail = event.effect
    elif event.outcome is Outcome.NOT_MATCHED:
        detail = f"no: {event.failed}" + (f" ({event.reason})" if event.reason else "")
    else:
        detail = f"could not interpret: {event.reason}"
    return f"{indent}{_SYMBOL[event.outcome]} {event.at.number}  {event.text}  [{detail}]"


def render_trace_json(trace: Trace) -> str:
    document = {
        "flow": _flow(trace.flow),
        "family": trace.family.label,
        "assumed": list(trace.assumed),
        "verdict": _verdict(trace.verdict),
        "not_walked": list(trace.not_walked),
        "events": [_event(event) for event in trace.events],
    }
    return json.dumps(document, indent=2) + "\n"


def _flow(flow: Flow) -> dict[str, Any]:
    return {
        "direction": flow.direction.value,
        "protocol": flow.protocol.value,
        "source": str(flow.source),
        "source_port": flow.source_port,
        "destination": str(flow.destination),
        "destination_port": flow.destination_port,
        "uid": flow.uid,
        "gid": flow.gid,
        "in_interface": flow.in_interface,
        "out_interface": flow.out_interface,
        "mark": flow.mark,
        "connmark": flow.connmark,
        "state": flow.state.value,
    }


def _location(at: Location | None) -> dict[str, Any] | None:
    if at is None:
        return None
    return {
        "hook": at.hook,
        "looped_back": at.looped_back,
        "table": at.table.value,
        "chain": at.chain,
        "number": at.number,
    }


def _verdict(verdict: TraceVerdict) -> dict[str, Any]:
    return {
        "text": verdict.text,
        "captured_by": verdict.captured_by,
        "capture": verdict.capture,
        "zone": verdict.zone,
        "mark": verdict.mark,
        "connmark": verdict.connmark,
        "dropped": verdict.dropped,
        "certain": verdict.certain,
        "decided_at": _location(verdict.decided_at),
        "uncertain_at": _location(verdict.uncertain_at),
    }


def _event(event: Event) -> dict[str, Any]:
    if isinstance(event, Note):
        return {
            "kind": "note",
            "hook": event.hook,
            "looped_back": event.looped_back,
            "table": event.table.value,
            "chain": event.chain,
            "depth": event.depth,
            "text": event.text,
        }
    return {
        "kind": "rule",
        **(_location(event.at) or {}),
        "depth": event.depth,
        "rule": event.text,
        "outcome": event.outcome.value,
        "failed": event.failed or None,
        "reason": event.reason or None,
        "effect": event.effect or None,
    }
