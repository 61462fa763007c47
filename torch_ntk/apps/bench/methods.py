"""Timing/memory harness and the standard empirical-NTK suite, shared by ``bench`` and benchmarks/.

Every (method, N, mode) runs in a fresh subprocess so that its peak RSS is its own; methods
are first checked to agree on a small input, then timed (median of repeats).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch
from torch import nn

from torch_ntk.apps.machine import machine_info, total_memory_gib

# Widths of the benchmark MLP: 64 -> 512 -> 512 -> 512 -> 10.
MLP_WIDTHS = (64, 512, 512, 512, 10)
METHODS = ("structured", "structured-torch", "jacobian", "func-jacrev", "func-ntk-vp")
# Peak memory of a method relative to one full Jacobian N·K·P (measured once, rounded up).
_JACOBIAN_COPIES = {"func-jacrev": 1.6, "func-ntk-vp": 1.3}


def mlp(dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """The benchmark MLP, seeded."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(MLP_WIDTHS[:-1], MLP_WIDTHS[1:])):
        layers += [nn.Linear(n_in, n_out)] + ([nn.ReLU()] if i < len(MLP_WIDTHS) - 2 else [])
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


def kernel(method: str, model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The NTK of ``model`` on ``x`` (x2 = x1) by one of ``METHODS``."""
    import torch_ntk
    if method in ("structured", "structured-torch"):
        return torch_ntk.empirical_ntk(model, x, mode=mode, method="structured")
    if method == "jacobian":
        return torch_ntk.empirical_ntk(model, x, mode=mode, method="jacobian")
    if method == "func-jacrev":
        return _func_jacrev(model, x, mode)
    if method == "func-ntk-vp":
        return _func_ntk_vp(model, x, mode)
    raise ValueError(f"unknown benchmark method {method!r}; expected one of {METHODS}")


def run_suite(sizes=(64, 256, 1024), modes=("full", "trace"), methods=METHODS,
              device: str = "cpu", repeats: int = 3, memory_limit_gib: float | None = None,
              log=print) -> dict:
    """Times every method on the benchmark MLP; returns a JSON-ready dict."""
    memory_limit = (memory_limit_gib or 0.7 * total_memory_gib()) * 2 ** 30
    log(f"checking that {', '.join(methods)} agree on N=8 ...")
    agreement = _check_agreement(methods, device)
    rows = []
    model = mlp()
    p = sum(q.numel() for q in model.parameters())
    for n in sizes:
        for mode in modes:
            for method in methods:
                need = _JACOBIAN_COPIES.get(method, 0.0) * n * MLP_WIDTHS[-1] * p * 4
                if need > memory_limit:
                    rows.append(dict(method=method, n=n, mode=mode, skipped=(
                        f"needs about {need / 2 ** 30:.0f} GiB, limit "
                        f"{memory_limit / 2 ** 30:.0f} GiB")))
                    log(f"{method:>16} N={n:<6} {mode:<5} skipped: {rows[-1]['skipped']}")
                    continue
                row = _run_worker(method, n, mode, device, repeats)
                rows.append(row)
                log(f"{method:>16} N={n:<6} {mode:<5} {row['seconds']:9.3f} s  "
                    f"peak RSS {row['peak_rss_gib']:6.2f} GiB")
    return dict(machine=machine_info(device), model=f"MLP {'-'.join(map(str, MLP_WIDTHS))} "
                f"(ReLU, float32, P={p})", agreement=agreement, rows=rows)


def format_table(result: dict, baseline: str = "structured") -> str:
    """Markdown table with time, peak RSS and the speed-up of ``baseline`` over each method."""
    base = {(r["n"], r["mode"]): r["seconds"] for r in result["rows"]
            if r["method"] == baseline and "seconds" in r}
    lines = ["| N | mode | method | time (s) | peak RSS (GiB) | time / structured |",
             "|---:|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['n']} | {r['mode']} | {r['method']} | skipped: {r['skipped']} "
                         "| | |")
            continue
        ratio = r["seconds"] / base[(r["n"], r["mode"])] if (r["n"], r["mode"]) in base else None
        lines.append(f"| {r['n']} | {r['mode']} | {r['method']} | {r['seconds']:.3f} | "
                     f"{r['peak_rss_gib']:.2f} | {'' if ratio is None else f'{ratio:.1f}x'} |")
    return "\n".join(lines)


def main_worker(argv: list[str]) -> None:
    """Subprocess entry: time one (method, N, mode) and print one JSON line."""
    method, n, mode, device, repeats = argv[0], int(argv[1]), argv[2], argv[3], int(argv[4])
    if method == "structured-torch":
        os.environ["TORCH_NTK_DISABLE_NATIVE"] = "1"
    model = mlp(device=device)
    torch.manual_seed(1)
    x = torch.randn(n, MLP_WIDTHS[0], device=device)
    kernel(method, model, x[:8], mode)  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        kernel(method, model, x, mode)
        _sync(device)
        times.append(time.perf_counter() - start)
        if times[-1] > 20:  # slow baselines: one timed run is enough
            break
    times.sort()
    print(json.dumps(dict(method=method, n=n, mode=mode, seconds=times[len(times) // 2],
                          repeats=len(times), peak_rss_gib=_peak_rss_gib())))


# Internal helpers

def _func_jacrev(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """torch.func recipe: whole-batch per-sample Jacobians, then one einsum."""
    from torch.func import functional_call, jacrev, vmap
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(theta, xi):
        return functional_call(model, theta, (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(f), (None, 0))(params, x)
    jac = [j.flatten(2) for j in jac.values()]
    eq = "Naf,Mbf->NMab" if mode == "full" else "Naf,Maf->NM"
    return sum(torch.einsum(eq, j, j) for j in jac)


def _func_ntk_vp(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """torch.func recipe: NTK-vector products (vjp then jvp) for every output basis vector."""
    from torch.func import functional_call, jvp, vjp, vmap
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(theta):
        return functional_call(model, theta, (x,))

    out, vjp_fn = vjp(f, params)
    n, k = out.shape

    def ntk_column(vec):
        (cotangent,) = vjp_fn(vec.reshape(n, k))
        return jvp(f, (params,), (cotangent,))[1]

    basis = torch.eye(n * k, dtype=out.dtype, device=out.device)
    cols = vmap(ntk_column)(basis).reshape(n, k, n, k).permute(0, 2, 1, 3)
    return cols if mode == "full" else torch.diagonal(cols, dim1=2, dim2=3).sum(-1)


def _check_agreement(methods, device: str) -> dict:
    """Max relative difference of each method to the jacobian reference at N=8 (float64)."""
    model = mlp(torch.float64, device)
    torch.manual_seed(2)
    x = torch.randn(8, MLP_WIDTHS[0], dtype=torch.float64, device=device)
    report = {}
    for mode in ("full", "trace"):
        ref = kernel("jacobian", model, x, mode)
        for method in methods:
            got = kernel(method, model, x, mode)
            err = float((got - ref).abs().max() / ref.abs().max())
            if err > 1e-9:
                raise RuntimeError(f"benchmark methods disagree: {method} ({mode}) differs from "
                                   f"the jacobian reference by {err:.2e} (relative)")
            report[f"{method}/{mode}"] = err
    return report


def _run_worker(method: str, n: int, mode: str, device: str, repeats: int) -> dict:
    cmd = [sys.executable, "-c", "import sys, torch_ntk.apps.bench.methods as b; b.main_worker(sys.argv[1:])",
           method, str(n), mode, device, str(repeats)]
    env = dict(os.environ)
    env.pop("TORCH_NTK_DISABLE_NATIVE", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return dict(method=method, n=n, mode=mode,
                    skipped=f"failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _peak_rss_gib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
