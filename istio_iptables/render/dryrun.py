"""What a dry run prints, and the command log Istio writes to ``DRY_RUN_FILE_PATH``."""

from __future__ import annotations

from ..config import DryRunFormat
from ..model import Family, Plan
from .commands import render_commands
from .json import render_json
from .restore import render_restore

RESTORE_COMMAND = {Family.V4: "iptables-restore --noflush", Family.V6: "ip6tables-restore --noflush"}


def dry_run_output(plan: Plan, output: DryRunFormat) -> str:
    if output is DryRunFormat.COMMANDS:
        return render_commands(plan)
    if output is DryRunFormat.JSON:
        return render_json(plan)
    return "".join(f"# {RESTORE_COMMAND[rs.family]}\n{render_restore(rs)}" for rs in plan.rulesets)


def istio_command_log(plan: Plan) -> str:
    """The lines Istio's dry-run executor records: the saves it runs, the payloads, the final saves."""
    ipv6 = Family.V6 in plan.families
    final_saves = "iptables-save\n" + ("ip6tables-save\n" if ipv6 else "")
    payloads = "".join(render_restore(ruleset) for ruleset in plan.rulesets)
    return "iptables-save\nip6tables-save\n" + payloads + final_saves
