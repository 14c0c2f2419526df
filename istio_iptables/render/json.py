"""The plan as JSON; README's "JSON schema" section documents the shape.

Clauses and targets are written generically from their record fields, so each one is
``{"match": <kind>, <field>: <value>, ..., "negated": bool}`` and ``{"target": <kind>, <field>: <value>}``,
where the kind is the model's class name in snake case (``destination_port``, ``uid_owner``, ``jump``).
"""

from __future__ import annotations

import enum
import json
import re

from istio_iptables.capture.model import AddressSet, InSet, Match, Plan, PortSet, Rule, Target, Verdict, declared_chains
from istio_iptables.records import field_names
from istio_iptables.render.iptables import rule_text

TYPE_CHECKING = False  # typing is not imported at run time (records.py says why)
if TYPE_CHECKING:
    from typing import Any

SCHEMA_VERSION = 1


def render_json(plan: Plan) -> str:
    document = {
        "version": SCHEMA_VERSION,
        "families": [
            {
                "family": ruleset.family.label,
                "tables": [
                    {
                        "table": table.value,
                        "chains": declared_chains(ruleset.rules).get(table, []),
                        "rules": [_rule(rule) for rule in ruleset.in_table(table)],
                    }
                    for table in ruleset.tables()
                ],
            }
            for ruleset in plan.rulesets
        ],
        "sets": [_set(ipset) for ipset in plan.sets],
        "routes": [{"family": route.family.label, "mark": route.mark, "table": route.table} for route in plan.routes],
        "loopback_addresses": [str(address) for address in plan.loopback_addresses],
    }
    return json.dumps(document, indent=2) + "\n"


def _set(ipset: AddressSet | PortSet) -> dict[str, Any]:
    if isinstance(ipset, AddressSet):
        return {"name": ipset.name, "type": "hash:net", "family": ipset.family.label, "members": _plain(ipset.networks)}
    return {"name": ipset.name, "type": "bitmap:port", "family": None, "members": list(ipset.ports)}


def _rule(rule: Rule) -> dict[str, Any]:
    return {
        "chain": rule.chain,
        "position": rule.position,
        "clauses": [_clause(clause) for clause in rule.clauses],
        "target": _target(rule.target),
        "comment": rule.comment,
        "text": rule_text(rule),
    }


def _clause(clause: Match) -> dict[str, Any]:
    fields = _fields(clause)
    if isinstance(clause, InSet):
        # Our lookups are all ``--match-set NAME dst``: the destination address, or port for a port set.
        fields = {"name": clause.name, "direction": "destination", "negated": clause.negated}
    return {"match": _kind(clause), **fields}


def _target(target: Target) -> dict[str, Any]:
    if isinstance(target, Verdict):
        return {"target": "verdict", "verdict": target.value}
    return {"target": _kind(target), **_fields(target)}


def _kind(value: Match | Target) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(value).__name__).lower()


def _fields(value: Any) -> dict[str, Any]:
    return {name: _plain(getattr(value, name)) for name in field_names(value)}


def _plain(value: Any) -> Any:
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return str(value)
