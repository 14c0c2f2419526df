"""The iptables-restore payload of one family, exactly as Istio writes it (reference 3.5), and the payloads
that move live tables to a plan."""

from __future__ import annotations

from istio_iptables.capture.model import RuleSet, declared_chains
from istio_iptables.render.iptables import rule_text


def render_restore(ruleset: RuleSet) -> str:
    """Tables sorted by name, each ``* table``, its ``-N`` lines, its rules in order, then ``COMMIT``."""
    chains = declared_chains(ruleset.rules)
    lines: list[str] = []
    for table in ruleset.tables():
        lines.append(f"* {table.value}")
        lines.extend(f"-N {chain}" for chain in chains.get(table, []))
        lines.extend(rule_text(rule) for rule in ruleset.in_table(table))
        lines.append("COMMIT")
    return "".join(line + "\n" for line in lines)
