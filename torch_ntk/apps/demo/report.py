"""The demo's printed summary table."""
from __future__ import annotations

from typing import Any


def format_summary(results: dict[str, Any]) -> str:
    cfg = results["config"]
    head = (f"NTK dynamics: depth {cfg['depth']} ReLU NTKMLP, β = {cfg['b_std']}, "
            f"{cfg['steps']} steps of lr {cfg['lr']}, {cfg['seeds']} seeds, "
            f"{cfg['circle_points']} circle points, {cfg['dtype']} on {cfg['device']}")
    cols = ("width", "|Θ0-Θ∞|/|Θ∞|", "|ΘT-Θ0|/|Θ0|", "net vs kernel", "net vs lin",
            "loss T")
    lines = [head, "", "  ".join(f"{c:>14s}" for c in cols)]
    for e in results["per_width"]:
        vals = [f"{e['width']:>14d}"]
        for m in ("init_rel_err", "drift", "net_vs_kernel", "net_vs_linearized", "loss_T"):
            vals.append(f"{e[m]['mean']:>8.2e}±{e[m]['std']:<5.0e}"[:14].rjust(14))
        lines.append("  ".join(vals))
    if results["slopes"]:
        lines.append("")
        names = {"init_rel_err": "NTK at init vs limit", "drift": "NTK drift during training",
                 "net_vs_kernel": "network vs kernel GD (Θ∞)",
                 "net_vs_linearized": "network vs linearized (Θ0)"}
        for m, s in results["slopes"].items():
            lines.append(f"log-log slope vs width, {names[m]:<28s} {s['slope']:+.2f}")
    lines.append(f"continuous- vs discrete-time floor of 'net vs kernel': "
                 f"{results['limit']['discretization_floor']:.1e}")
    return "\n".join(lines)

