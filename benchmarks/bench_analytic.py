"""Infinite-width kernels: analytic_ntk speed and memory, and width convergence of NTKMLP.

Usage: python benchmarks/bench_analytic.py [--n 20000] [--depth 5] [--repeats 3]
       [--widths 64 128 256 512 1024 2048 4096] [--seeds 3] [--json out.json]

1. ``analytic_ntk(x, depth=5, activation="relu")`` for N inputs in float64 on CPU (x2=None, the
   symmetric case): median wall and CPU time over repeats, the 1-minute load average (the
   wall time depends on other processes on a shared machine), and peak RSS, measured in a fresh
   process so the RSS is the kernel's alone; the Hermite-expansion path (tanh) at a smaller N
   for scale.
   Before timing, a block of rows is checked against an independent call on those rows.
2. Width convergence: the empirical NTK (``empirical_ntk(..., mode="trace") / K``) of depth-3
   ReLU ``NTKMLP``s of growing width, a few seeds each, against ``analytic_ntk``: relative
   Frobenius error and the fitted log-log slope (theory: -0.5).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import numpy as np
import torch

import torch_ntk
from torch_ntk.apps.bench import harness
from torch_ntk.apps.machine import machine_info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="inputs for the timing (N)")
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--features", type=int, default=32, help="input size n0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hermite-n", type=int, default=2000,
                        help="inputs for the tanh (Hermite expansion) timing; 0 skips it")
    parser.add_argument("--widths", type=int, nargs="+",
                        default=[64, 128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)

    result = {"machine": machine_info("cpu"), "timing": [], "convergence": None}
    cases = [("relu", args.n, args.depth)]
    if args.hermite_n:
        cases.append(("tanh", args.hermite_n, 3))
    for act, n, depth in cases:
        result["timing"].append(_timing(act, n, depth, args.features, args.repeats))
    result["convergence"] = _convergence(args.widths, args.seeds)
    print(_format(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def timing_worker(act: str, n: int, depth: int, features: int, repeats: int) -> dict:
    """Worker (fresh process): times ``analytic_ntk`` on N random inputs, x2=None."""
    torch.manual_seed(0)
    x = torch.randn(n, features, dtype=torch.float64)
    rss_start = harness.peak_rss_gib()
    # Warm-up and agreement: rows 0..63 of the full kernel against their own call.
    block = torch_ntk.analytic_ntk(x[:64], x, depth=depth, activation=act)
    times, cpu, max_dev = [], [], None
    load_before = harness.load_average()
    for _ in range(repeats):
        usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        k = torch_ntk.analytic_ntk(x, depth=depth, activation=act)
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append(after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime)
        if max_dev is None:
            max_dev = float(((k[:64] - block).abs() / block.abs().max()).max())
            finite = all(bool(torch.isfinite(rows).all()) for rows in k.split(1024))
        del k
    return dict(activation=act, n=n, depth=depth, features=features, dtype="float64",
                repeats=repeats, seconds_median=statistics.median(times), seconds_all=times,
                cpu_seconds_median=statistics.median(cpu), threads=torch.get_num_threads(),
                load_average_1min=[load_before, harness.load_average()],
                output_gib=n * n * 8 / 2 ** 30, peak_rss_gib=harness.peak_rss_gib(),
                rss_before_gib=rss_start,
                rows_check_max_rel_dev=max_dev, finite=finite)


# Internal helpers

def _timing(act: str, n: int, depth: int, features: int, repeats: int) -> dict:
    """Runs the timing in a fresh process so that its peak RSS is the kernel's alone."""
    res = harness.run_isolated(f"{os.path.abspath(__file__)}:timing_worker",
                               dict(act=act, n=n, depth=depth, features=features,
                                    repeats=repeats))
    return dict(activation=act, n=n, depth=depth, **res) if "skipped" in res else res


def _convergence(widths: list[int], seeds: int, n: int = 16, features: int = 8,
                 out_features: int = 2) -> dict:
    torch.manual_seed(1234)
    x = torch.randn(n, features, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * features ** 0.5
    kw = dict(depth=3, activation="relu", w_std=1.0, b_std=0.1)
    limit = torch_ntk.analytic_ntk(x, **kw)
    rows = []
    for width in widths:
        errors, start = [], time.perf_counter()
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = torch_ntk.NTKMLP(features, width, out_features=out_features,
                                     dtype=torch.float64, **kw)
            k = torch_ntk.empirical_ntk(model, x, mode="trace") / out_features
            errors.append(float((k - limit).norm() / limit.norm()))
            del model
        rows.append(dict(width=width, rel_frobenius_error_mean=float(np.mean(errors)),
                         rel_frobenius_error_seeds=errors,
                         seconds=time.perf_counter() - start))
    slope = float(np.polyfit(np.log([r["width"] for r in rows]),
                             np.log([r["rel_frobenius_error_mean"] for r in rows]), 1)[0])
    return dict(setup=dict(n=n, features=features, out_features=out_features, seeds=seeds,
                           dtype="float64", **kw), rows=rows, loglog_slope=slope)


def _format(result: dict) -> str:
    m = result["machine"]
    lines = [f"# analytic_ntk on {m['cpu']} ({m['threads']} threads), torch {m['torch']}, "
             f"{m['date']}", "",
             "| activation | path | N | depth | median s | CPU s | load avg | peak RSS GiB "
             "| output GiB | rows check |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["timing"]:
        path = "closed form" if r["activation"] in ("relu", "erf", "identity") else "Hermite"
        if "skipped" in r:
            lines.append(f"| {r['activation']} | {path} | {r['n']} | {r['depth']} | "
                         f"{r['skipped']} | | | | | |")
            continue
        lines.append(f"| {r['activation']} | {path} | {r['n']} | {r['depth']} | "
                     f"{r['seconds_median']:.2f} | {r['cpu_seconds_median']:.2f} | "
                     f"{max(r['load_average_1min']):.1f} | {r['peak_rss_gib']:.2f} | "
                     f"{r['output_gib']:.2f} | {r['rows_check_max_rel_dev']:.1e} |")
    c = result["convergence"]
    s = c["setup"]
    lines += ["", f"# NTKMLP depth {s['depth']} {s['activation']} (w_std={s['w_std']}, "
              f"b_std={s['b_std']}), N={s['n']}, {s['seeds']} seeds: empirical vs limit", "",
              "| width | rel. Frobenius error (mean) | per seed | s |", "| --- | --- | --- | --- |"]
    for r in c["rows"]:
        seeds = ", ".join(f"{e:.4f}" for e in r["rel_frobenius_error_seeds"])
        lines.append(f"| {r['width']} | {r['rel_frobenius_error_mean']:.4f} | {seeds} | "
                     f"{r['seconds']:.1f} |")
    lines += ["", f"log-log slope of error vs width: {c['loglog_slope']:.3f} (theory -0.5)"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
