"""What the checks cost: their share of an empirical_ntk call on the benchmark zoo.

Each call checks every block of x1 and x2 (``torch_ntk/empirical/verify.py``): the random
direction (``direction``) and the factors' prediction of ``J r`` (``Projection``), and a
forward-mode pass of the model on the block split in two reordered sub-batches
(``split_forward``). The probe at the start
of a call (``KernelPlan.__enter__``: probe forward, determinism, samples alone) is timed apart.
Everything is measured inside one process by timing those functions during real calls.

Usage: python benchmarks/bench_checks.py [--json benchmarks/results/cpu_checks.json]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time

import torch

import torch_ntk
from torch_ntk.apps.bench import models
from torch_ntk.empirical import api, verify

CASES = [("mlp", 256, "full"), ("mlp", 256, "trace"), ("mlp", 1024, "full"),
         ("mlp", 1024, "trace"), ("cnn", 128, "full"), ("transformer", 128, "full"),
         ("transformer-30k", 64, "full"), ("gru", 128, "full")]
REPEATS = 3


class Timers:
    """Seconds spent in the wrapped functions during one call, by label."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def wrapping(self, owner, name: str, label: str):
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)
        try:
            yield
        finally:
            setattr(owner, name, inner)


def measure(name: str, n: int, mode: str) -> dict:
    model = models.build(name)
    x = models.inputs(name, n)
    torch_ntk.empirical_ntk(model, x, mode=mode)  # warm-up
    rows = []
    for _ in range(REPEATS):
        timers = Timers()
        with contextlib.ExitStack() as stack:
            stack.enter_context(timers.wrapping(api.KernelPlan, "__enter__", "probe"))
            stack.enter_context(timers.wrapping(verify, "split_forward", "split"))
            stack.enter_context(timers.wrapping(verify, "direction", "direction"))
            for method in ("add_gram", "add_gradients", "add_tokens"):
                stack.enter_context(timers.wrapping(verify.Projection, method, "projection"))
            start = time.perf_counter()
            torch_ntk.empirical_ntk(model, x, mode=mode)
            total = time.perf_counter() - start
        rows.append((total, timers.seconds.get("probe", 0.0), timers.seconds.get("split", 0.0),
                     timers.seconds.get("projection", 0.0) + timers.seconds.get("direction", 0.0)))
    total, probe, split, projection = (statistics.median(r[i] for r in rows) for i in range(4))
    with api.KernelPlan(model, x, mode=mode) as plan:
        engine = plan.engine.name
    return dict(model=name, n=n, mode=mode, engine=engine, total_s=total, probe_s=probe,
                split_forward_s=split, projection_s=projection,
                checks_share=(split + projection) / total, probe_share=probe / total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    out = dict(machine=f"{platform.processor() or platform.machine()}, "
                       f"{torch.get_num_threads()} threads, torch {torch.__version__}",
               date=time.strftime("%Y-%m-%d %H:%M"), rows=[])
    print(f"{'model':16s} {'N':>5s} {'mode':6s} {'engine':10s} {'call':>8s} {'checks':>8s} "
          f"{'share':>6s} {'probe':>8s}")
    for name, n, mode in CASES:
        row = measure(name, n, mode)
        out["rows"].append(row)
        checks = row["split_forward_s"] + row["projection_s"]
        print(f"{name:16s} {n:5d} {mode:6s} {row['engine']:10s} {row['total_s']:7.3f}s "
              f"{checks:7.3f}s {100 * row['checks_share']:5.1f}% {row['probe_s']:7.3f}s",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
