"""Infinite-width kernels of a Myrtle-style CNN: torch_ntk next to neural-tangents, same machine.

Usage: python benchmarks/bench_cntk.py [--nt-python /path/to/ntenv/bin/python] [--n 128]
       [--memory-n 2000] [--repeats 3] [--json out.json]

The network: three 3×3 "same" convolutions with ReLU, 2×2 average pooling after the second and
the third, global average pooling and a dense layer, on 8×8×1 inputs; float64, x2 = None, the
NTK. Every layer keeps all pairs of positions (pooling follows), so a pair of inputs carries
64² entries through the first two layers.

- torch_ntk: ``analytic_ntk(model, x)`` with the native core (the whole network but the
  dense layer is one ``pair_chain`` per tile) and with it switched off (the pure-torch rules),
  each in its own process; the median of the repeats after a first call. At ``--memory-n`` inputs (the kernel
  alone is N²·8 bytes) the peak resident memory of one call.
- neural-tangents 0.6.5 (``--nt-python``, the environment of bench_neural_tangents.py's
  docstring): ``jax.jit(kernel_fn)`` and ``nt.batch(kernel_fn, batch_size)`` for a few batch
  sizes (``--nt-batch-sizes``, default 0 = jit alone and 64), by
  ``benchmarks/nt_architectures.py``; its fastest setting is the comparison.

The two libraries alternate for ``--rounds`` rounds and the ratio is quoted per round (the
machine's speed drifts over minutes).

Each measurement runs in a fresh process, and the 1-minute load average is recorded next to
it (other processes compete for the cores).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def myrtle():
    """The benchmark network (channels don't matter for the limit)."""
    from torch import nn

    import torch_ntk

    def conv(c_in, c_out):
        return torch_ntk.NTKConv2d(c_in, c_out, 3, padding="same")

    return nn.Sequential(conv(1, 8), nn.ReLU(), conv(8, 8), nn.ReLU(), nn.AvgPool2d(2),
                         conv(8, 8), nn.ReLU(), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), torch_ntk.NTKLinear(8, 1, w_std=1.0))


def measure(n: int, native: bool = True, repeats: int = 3, seed: int = 0) -> dict:
    """Worker: times ``analytic_ntk(myrtle(), x)`` on n random inputs (float64)."""
    import contextlib
    import time

    import torch

    import torch_ntk
    from torch_ntk.apps.bench import harness
    from torch_ntk.native import route

    x = torch.randn(n, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    model = myrtle()
    ctx = contextlib.nullcontext() if native else route.native_disabled()
    with ctx:
        start = time.perf_counter()
        k = torch_ntk.analytic_ntk(model, x)
        first = time.perf_counter() - start
        seconds = (harness.median_time(lambda: torch_ntk.analytic_ntk(model, x),
                                       repeats=repeats, warmup=lambda: None)["seconds"]
                   if repeats else first)
    return dict(seconds=seconds, first_call_s=first, peak_rss_gib=harness.peak_rss_gib(),
                kernel_gib=k.numel() * k.element_size() / 2 ** 30,
                threads=torch.get_num_threads(), native=native,
                native_info=torch_ntk.native.info()["cpu"],
                checksum=float(k.double().sum()))


def run(nt_python: str | None, n: int, memory_n: int, repeats: int, rounds: int = 3,
        nt_batch_sizes=(0, 64)) -> dict:
    from torch_ntk.apps.bench import harness
    from torch_ntk.apps.machine import machine_info

    me = os.path.abspath(__file__)
    rows = []

    def record(name, target, kwargs, python=None, timeout=1800):
        before = harness.load_average()
        row = dict(name=name)
        row.update(harness.run_isolated(target, kwargs, python=python, timeout=timeout))
        row["load_before"] = before
        timed = [r for r in row.get("rows", []) if "seconds" in r]
        if timed:   # neural-tangents: its fastest batch size
            best = min(timed, key=lambda r: r["seconds"])
            row.update(seconds=best["seconds"], first_call_s=best["first_call_s"],
                       peak_rss_gib=best["peak_rss_gib"], best_batch_size=best["batch_size"])
        row["load_after"] = harness.load_average()
        rows.append(row)
        print(json.dumps(row), flush=True)

    ratios = []
    for round_ in range(rounds):   # alternate the two libraries: the machine's speed drifts
        record(f"torch_ntk native N={n} (round {round_ + 1})", f"{me}:measure",
               dict(n=n, repeats=repeats))
        if nt_python:
            record(f"neural-tangents N={n} (round {round_ + 1})",
                   os.path.join(HERE, "nt_architectures.py") + ":nt_time_myrtle",
                   dict(n=n, repeats=repeats, batch_sizes=list(nt_batch_sizes)), python=nt_python)
            ours, theirs = rows[-2].get("seconds"), rows[-1].get("seconds")
            if ours and theirs:
                ratios.append(theirs / ours)
    record(f"torch_ntk pure torch N={n}", f"{me}:measure", dict(n=n, native=False, repeats=1))
    if memory_n:
        record(f"torch_ntk native N={memory_n}", f"{me}:measure", dict(n=memory_n, repeats=0))
    out = dict(machine=machine_info("cpu"), n=n, memory_n=memory_n, rows=rows,
               neural_tangents_over_torch_ntk=ratios)
    return out


def format_table(result: dict) -> str:
    lines = ["| run | seconds | first call (s) | peak RSS (GiB) | load avg |",
             "|---|---:|---:|---:|---|"]
    for r in result["rows"]:
        sec = r.get("seconds", r.get("best_seconds", float("nan")))
        lines.append(f"| {r['name']} | {sec:.3f} | {r.get('first_call_s', float('nan')):.3f} | "
                     f"{r.get('peak_rss_gib', float('nan')):.2f} | "
                     f"{r['load_before']:.1f} -> {r['load_after']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nt-python", default=None)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--memory-n", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternations of torch_ntk and neural-tangents at --n")
    parser.add_argument("--nt-batch-sizes", type=int, nargs="+", default=[0, 64],
                        help="neural-tangents settings: 0 = jax.jit alone, b = nt.batch(b)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    result = run(args.nt_python, args.n, args.memory_n, args.repeats, args.rounds,
                 args.nt_batch_sizes)
    print(format_table(result))
    ratios = result["neural_tangents_over_torch_ntk"]
    if ratios:
        print("neural-tangents (its fastest setting) / torch_ntk, per round: "
              + ", ".join(f"{r:.1f}x" for r in ratios))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))
    main()
