"""What ``auto`` takes, next to both methods, where the structured contraction saves little.

Usage: python benchmarks/bench_choice.py [--n 64] [--mode trace] [--repeats 3] [--json out.json]

The experiment's NTK-parameterised ReLU CNNs (``torch_ntk.apps.demo.cnn.build``: "gap",
"myrtle", "flatten") on (N, 1, 8, 8) inputs in float64, x2 = None: ``method="structured"``,
``method="jacobian"`` and ``auto`` alternate in one process (median of ``--repeats``), and the
engine auto chose is read from ``KernelPlan`` with its reason.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import torch_ntk
from torch_ntk.apps.demo import cnn
from torch_ntk.empirical.api import KernelPlan

NETWORKS = [("gap", 64), ("gap", 256), ("myrtle", 128), ("flatten", 64)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--mode", default="trace")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for arch, channels in NETWORKS:
        torch.manual_seed(0)
        model = cnn.build(arch, channels)
        x = torch.randn(args.n, 1, 8, 8, dtype=torch.float64)
        with KernelPlan(model, x, mode=args.mode) as plan:
            chose, reason = plan.engine.name, getattr(plan.engine, "reason", None)
        fns = {m: (lambda m=m: torch_ntk.empirical_ntk(model, x, mode=args.mode, method=m))
               for m in ("structured", "jacobian", "auto")}
        for fn in fns.values():
            fn()
        times = {m: [] for m in fns}
        for _ in range(args.repeats):
            for m, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[m].append(time.perf_counter() - start)
        row = {"arch": arch, "channels": channels, "n": args.n, "mode": args.mode,
               "auto_took": chose, "reason": reason,
               **{m: statistics.median(v) for m, v in times.items()}}
        rows.append(row)
        print(f"{arch:8s} C={channels:4d}  structured {row['structured']:.3f} s  jacobian "
              f"{row['jacobian']:.3f} s  auto {row['auto']:.3f} s  (auto took {chose}, "
              f"{reason})", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"dtype": "float64", "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "rows": rows}, fh, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
