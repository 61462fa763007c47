"""Native gram_sum op vs the pure-torch composition on the benchmark MLP's factors.

Factors of the MLP 64 -> 512 -> 512 -> 512 -> 10 (K = 10, biases: c = 1): input widths
p = (64, 512, 512, 512), output-gradient widths q = (512, 512, 512, 10). Both methods run in
one process on the same random factors, are checked to agree, then timed (median of repeats,
interleaved). Peak extra memory is the RSS growth of a fresh subprocess (CPU) or
``torch.cuda.max_memory_allocated`` above the inputs and output (GPU). On GPU the table also
shows a cuBLAS GEMM with the same output shape and FLOPs, and the fraction of its rate reached.

    python benchmarks/bench_native.py --device cpu --sizes 256 1024 --json out.json

``python -m torch_ntk bench`` runs it after the end-to-end suite of ``methods``.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from torch_ntk.apps.bench import harness
from torch_ntk.apps.machine import machine_info
from torch_ntk.native import loader, route
from torch_ntk.native.gram import _gram_sum_torch

P_WIDTHS = (64, 512, 512, 512)
Q_WIDTHS = (512, 512, 512, 10)
K = 10
METHODS = ("torch", "native")


def run(device: str = "cpu", sizes=(256, 1024), modes=("full", "trace"),
        dtype: torch.dtype = torch.float32, repeats: int = 5, symmetric: bool = False,
        memory: bool = True, gemm: bool | None = None, verbose: bool = True) -> dict:
    """Times both methods for every (N, mode); returns the JSON-ready record.

    Args:
        device (str): ``"cpu"`` or ``"cuda"``.
        sizes (sequence of int): N = N1 = N2.
        modes (sequence of str): among ``"full"``, ``"trace"``, ``"diagonal"``.
        symmetric (bool): one batch with itself (``symmetric=True`` in both methods).
        memory (bool): measure peak extra memory (CPU: one subprocess per method and size).
        gemm (bool, optional): time the same-FLOP GEMM; default on for CUDA only.
    Returns:
        dict: ``{"machine": {...}, "results": [row, ...]}``; a row has n, mode, seconds and
        peak extra MiB per method, ``speedup`` (torch / native), GFLOP/s and, with ``gemm``,
        ``gemm_s`` and ``native_vs_gemm`` (fraction of the GEMM's rate).
    """
    device = torch.device(device)
    gemm = device.type == "cuda" if gemm is None else gemm
    rows = []
    for n in sizes:
        for mode in modes:
            row = _bench_one(device, n, mode, dtype, repeats, symmetric, memory, gemm)
            rows.append(row)
            if verbose:
                print(_format_row(row), flush=True)
    return {"machine": machine_info(device), "dtype": str(dtype).replace("torch.", ""),
            "symmetric": symmetric, "layers": {"p": P_WIDTHS, "q": Q_WIDTHS, "K": K},
            "results": rows}


def mlp_factors(n: int, device, dtype, seed: int):
    """Random factors with the MLP's shapes: h (N, p_l), d (N, K, q_l), c = 1 per layer."""
    g = torch.Generator().manual_seed(seed)
    h = [(torch.randn(n, p, generator=g) / p ** 0.5).to(device, dtype) for p in P_WIDTHS]
    d = [(torch.randn(n, K, q, generator=g) / q ** 0.5).to(device, dtype) for q in Q_WIDTHS]
    return h, d, [1.0] * len(P_WIDTHS)


def flops(n1: int, n2: int, mode: str) -> float:
    """Multiply-adds x 2 of the Gram products (the Hadamard sums are not counted)."""
    inner = sum(p + (K * K * q if mode == "full" else K * q) for p, q in zip(P_WIDTHS, Q_WIDTHS))
    return 2.0 * n1 * n2 * inner


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--modes", nargs="+", default=["full", "trace"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--symmetric", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--gemm", action="store_true", help="also time the same-FLOP GEMM on CPU")
    parser.add_argument("--json", help="write the record here")
    args = parser.parse_args(argv)
    record = run(args.device, args.sizes, args.modes, getattr(torch, args.dtype), args.repeats,
                 args.symmetric, not args.no_memory, True if args.gemm else None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"wrote {args.json}")
    return record


# Internal helpers

def _call(method: str, h, d, h2, d2, c, mode: str, out, symmetric: bool):
    if method == "torch":
        _gram_sum_torch(h, h2, d, d2, c, mode=mode, out=out, symmetric=symmetric)
    elif symmetric:
        torch.ops.torch_ntk.gram_sum_sym_out(h, d, c, mode, out)
    else:
        torch.ops.torch_ntk.gram_sum_out(h, h2, d, d2, c, mode, out)


def _shape(n: int, mode: str):
    return {"full": (n, n, K, K), "trace": (n, n), "diagonal": (n, n, K)}[mode]


def _bench_one(device, n, mode, dtype, repeats, symmetric, memory, gemm) -> dict:
    h, d, c = mlp_factors(n, device, dtype, seed=0)
    h2, d2 = (h, d) if symmetric else mlp_factors(n, device, dtype, seed=1)[:2]
    methods = [m for m in METHODS if m == "torch" or route.native_available(device.type)]
    outs = {m: torch.empty(_shape(n, mode), dtype=dtype, device=device) for m in methods}
    row = {"n": n, "mode": mode, "flop": flops(n, n, mode), "out_mib": _mib(outs["torch"])}
    for m in methods:  # warm-up and agreement check
        _call(m, h, d, h2, d2, c, mode, outs[m], symmetric)
    if "native" in outs:
        ref = outs["torch"]
        err = float((outs["native"] - ref).abs().max() / ref.abs().max())
        row["max_rel_diff"] = err
        if err > (1e-3 if dtype == torch.float32 else 1e-10):
            raise RuntimeError(f"native and torch disagree at N={n} {mode}: {err:.3g}")
    else:
        row["note"] = f"no native kernel for {device.type}: {loader.LOAD_ERROR}"
    times = {m: [] for m in methods}
    for _ in range(repeats):  # interleaved, so drifting machine load hits both alike
        for m in methods:
            harness.sync(device.type)
            t0 = time.perf_counter()
            _call(m, h, d, h2, d2, c, mode, outs[m], symmetric)
            harness.sync(device.type)
            times[m].append(time.perf_counter() - t0)
    for m in methods:
        row[f"{m}_s"] = statistics.median(times[m])
        row[f"{m}_gflops"] = row["flop"] / row[f"{m}_s"] / 1e9
    if "native" in outs:
        row["speedup"] = row["torch_s"] / row["native_s"]
    if memory:
        for m in methods:
            row[f"{m}_peak_extra_mib"] = (_child_memory(m, n, mode, dtype, symmetric)
                                          if device.type == "cpu" else
                                          _cuda_memory(m, h, d, h2, d2, c, mode, outs[m],
                                                       symmetric))
    if gemm:
        row.update(_gemm_reference(device, n, mode, dtype, repeats, row))
    del outs
    return row


def _gemm_reference(device, n, mode, dtype, repeats, row) -> dict:
    """Same output shape as the op's Gram view ((N*K, N*K) full, (N, N) otherwise), same FLOPs."""
    m = n * K if mode == "full" else n
    inner = max(1, round(row["flop"] / (2.0 * m * m)))
    a = torch.randn(m, inner, device=device, dtype=dtype)
    b = torch.randn(inner, m, device=device, dtype=dtype)
    c = torch.empty(m, m, device=device, dtype=dtype)
    torch.mm(a, b, out=c)
    times = []
    for _ in range(repeats):
        harness.sync(device.type)
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        harness.sync(device.type)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    res = {"gemm_s": t, "gemm_gflops": 2.0 * m * m * inner / t / 1e9}
    if "native_s" in row:
        res["native_vs_gemm"] = res["gemm_gflops"] and row["native_gflops"] / res["gemm_gflops"]
    return res


def _cuda_memory(method, h, d, h2, d2, c, mode, out, symmetric) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _call(method, h, d, h2, d2, c, mode, out, symmetric)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def _child_memory(method, n, mode, dtype, symmetric) -> float | None:
    """Peak RSS growth (MiB) of one call in a fresh process, inputs and out already allocated."""
    res = harness.run_isolated(
        "torch_ntk.apps.bench.gram:child_memory",
        dict(method=method, n=n, mode=mode, dtype=str(dtype).replace("torch.", ""),
             symmetric=symmetric))
    if "skipped" in res:
        print(f"  extra memory of {method} N={n} {mode} not measured: {res['skipped']}")
        return None
    return res["peak_extra_mib"]


def child_memory(method: str, n: int, mode: str, dtype: str, symmetric: bool) -> dict:
    """Worker (fresh process): RSS growth of one call above its inputs and output.

    Returns:
        dict: ``peak_extra_mib``.
    """
    dtype = getattr(torch, dtype)
    h, d, c = mlp_factors(n, "cpu", dtype, seed=0)
    h2, d2 = (h, d) if symmetric else mlp_factors(n, "cpu", dtype, seed=1)[:2]
    out = torch.ones(_shape(n, mode), dtype=dtype)  # touched, so it counts in the baseline
    _call(method, h, d, h2, d2, c, mode, out, symmetric)  # warm-up: lazy inits, thread pools
    if harness.reset_peak_rss():  # Linux: the peak then covers only the measured call
        base = harness.rss_kib("VmRSS")
        _call(method, h, d, h2, d2, c, mode, out, symmetric)
        peak = harness.rss_kib("VmHWM")
    else:  # elsewhere: peak since start, which may hide a smaller call's peak
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        _call(method, h, d, h2, d2, c, mode, out, symmetric)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_extra_mib": max(peak - base, 0) / 1024}


def _mib(t: torch.Tensor) -> float:
    return t.numel() * t.element_size() / 2 ** 20


def _format_row(r: dict) -> str:
    text = f"N={r['n']:>6} {r['mode']:<8} torch {r['torch_s']:8.4f}s"
    if "native_s" in r:
        text += (f"  native {r['native_s']:8.4f}s  speedup {r['speedup']:5.2f}x"
                 f"  ({r['native_gflops']:7.1f} GFLOP/s)")
    for m in METHODS:
        if r.get(f"{m}_peak_extra_mib") is not None:
            text += f"  {m} +{r[f'{m}_peak_extra_mib']:.1f} MiB"
    if "gemm_s" in r:
        text += f"  gemm {r['gemm_s']:.4f}s"
        if "native_vs_gemm" in r:
            text += f" ({100 * r['native_vs_gemm']:.0f}% of GEMM rate)"
    return text + f"  [out {r['out_mib']:.0f} MiB]"


if __name__ == "__main__":
    main()
