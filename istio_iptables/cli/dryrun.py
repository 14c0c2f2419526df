"""What a dry run prints, and the command log Istio writes to ``DRY_RUN_FILE_PATH``."""

from __future__ import annotations

from istio_iptables.capture.config import DryRunFormat
from istio_iptables.capture.model import Family, Plan, RuleSet
from istio_iptables.render.commands import render_commands
from istio_iptables.render.iptables import ipset_payload
from istio_iptables.render.json import render_json
from istio_iptables.render.restore import render_restore
from istio_iptables.state import tables_holding
from istio_iptables.state.changes import render_transition

RESTORE_COMMAND = {Family.V4: "iptables-restore --noflush", Family.V6: "ip6tables-restore --noflush"}


def dry_run_output(plan: Plan, output: DryRunFormat) -> str:
    if output is DryRunFormat.COMMANDS:
        return render_commands(plan)
    if output is DryRunFormat.JSON:
        return render_json(plan)
    sets = f"# ipset restore\n{ipset_payload(plan.sets)}" if plan.sets else ""
    return sets + "".join(f"# {RESTORE_COMMAND[rs.family]}\n{render_restore(rs)}" for rs in plan.rulesets)


def cleanup_output(plan: Plan) -> str:
    """What ``--cleanup-only`` would send to a namespace holding exactly this plan (a real clean-up works
    from the live state and also removes what other configurations left)."""
    text = ""
    for ruleset in plan.rulesets:
        cleanup = render_transition(RuleSet(ruleset.family, ()), tables_holding(ruleset.rules))
        text += f"# {RESTORE_COMMAND[ruleset.family]}\n{cleanup}"
    ip = {Family.V4: "ip", Family.V6: "ip -6"}
    for route in plan.routes:
        text += f"# {ip[route.family]} rule del fwmark {route.mark} lookup {route.table}\n"
        text += f"# {ip[route.family]} route del local default dev lo table {route.table}\n"
    text += "".join(f"# ip -6 addr del {address} dev lo\n" for address in plan.loopback_addresses)
    return text


def istio_command_log(plan: Plan) -> str:
    """The lines Istio's dry-run executor records: the saves it runs, the payloads, the final saves."""
    ipv6 = Family.V6 in plan.families
    final_saves = "iptables-save\n" + ("ip6tables-save\n" if ipv6 else "")
    payloads = "".join(render_restore(ruleset) for ruleset in plan.rulesets)
    return "iptables-save\nip6tables-save\n" + payloads + final_saves
