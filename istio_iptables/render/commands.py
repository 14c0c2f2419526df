"""The plan as shell commands a person can read or paste: iptables, ip6tables and ip, one per line."""

from __future__ import annotations

from istio_iptables.capture.model import Family, Plan, declared_chains
from istio_iptables.render.iptables import ipset_payload, rule_text


def render_commands(plan: Plan) -> str:
    lines: list[str] = [f"ipset {line}" for line in ipset_payload(plan.sets).splitlines()]
    for ruleset in plan.rulesets:
        binary = "iptables" if ruleset.family is Family.V4 else "ip6tables"
        chains = declared_chains(ruleset.rules)
        for table in ruleset.tables():
            lines.extend(f"{binary} -t {table.value} -N {chain}" for chain in chains.get(table, []))
            lines.extend(f"{binary} -t {table.value} {rule_text(rule)}" for rule in ruleset.in_table(table))
    for address in plan.loopback_addresses:
        lines.append(f"ip -6 addr add {address} dev lo")
    for route in plan.routes:
        ip = "ip" if route.family is Family.V4 else "ip -6"
        lines.append(f"{ip} rule add fwmark {route.mark} lookup {route.table}")
        lines.append(f"{ip} route add local default dev lo table {route.table}")
    return "".join(line + "\n" for line in lines)
