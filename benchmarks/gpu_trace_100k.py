"""Trace NTK of the benchmark MLP (64-512-512-512-10) for N = 100,000 inputs, computed on the GPU into host memory.

Fills ``out`` (N, N) float32 in host memory (pinned when possible) with
``torch_ntk.empirical_ntk(model, x, mode="trace", out=out)``, then checks a few entries (rows
and columns spread over the matrix, including the last ones) against a float64 recomputation
with ``method="jacobian"`` on those slices, and the symmetry of a few mirrored entries.

    python benchmarks/gpu_trace_100k.py --json gpu_out/trace_100k.json
    python benchmarks/gpu_trace_100k.py --device cpu --n 300      # smoke test without a GPU
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

import torch_ntk
from torch_ntk import native
from torch_ntk.apps.bench.methods import mlp


def run(n: int = 100_000, device: str = "cuda", pin: bool = True, checks: int = 12,
        tol: float = 2e-4, seed: int = 0) -> dict:
    """Computes the kernel, times it and checks entries; returns the JSON-ready record."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    model = mlp(torch.float32, str(device))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g).to(device)
    rec = {"n": n, "device": str(device), "mode": "trace", "dtype": "float32",
           "torch": torch.__version__, "native": native.info(),
           "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
           "out_gib": n * n * 4 / 2 ** 30}
    if cuda:
        rec["gpu"] = torch.cuda.get_device_name(device)

    t0 = time.perf_counter()
    pinned = False
    if cuda and pin:
        try:
            out = torch.empty((n, n), dtype=torch.float32, pin_memory=True)
            pinned = True
        except RuntimeError as exc:  # too large to pin: pageable memory
            rec["pin_error"] = str(exc).splitlines()[0]
            out = torch.empty((n, n), dtype=torch.float32)
    else:
        out = torch.empty((n, n), dtype=torch.float32)
    rec["pinned"] = pinned
    rec["alloc_s"] = time.perf_counter() - t0

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    torch_ntk.empirical_ntk(model, x, mode="trace", out=out)
    if cuda:
        torch.cuda.synchronize(device)
    rec["wall_s"] = time.perf_counter() - t0
    if cuda:
        rec["gpu_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        rec["gpu_peak_extra_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
        rec["gpu_total_mib"] = torch.cuda.get_device_properties(device).total_memory / 2 ** 20
    flop = 2.0 * n * n * sum(p + 10 * q for p, q in zip((64, 512, 512, 512), (512, 512, 512, 10)))
    rec["gram_tflops"] = flop / 2 / rec["wall_s"] / 1e12  # symmetric: half the tiles computed

    # Float64 recomputation of a few rows x columns (independent method: the Jacobian).
    idx = torch.unique(torch.cat([torch.tensor([0, n - 1]),
                                  torch.randint(0, n, (max(checks - 2, 0),), generator=g)]))
    cols = torch.unique(torch.cat([torch.tensor([0, n // 2, n - 1]),
                                   torch.randint(0, n, (max(checks - 3, 0),), generator=g)]))
    model64 = copy.deepcopy(model).double()
    xi, xc = x[idx.to(device)].double(), x[cols.to(device)].double()
    ref = torch_ntk.empirical_ntk(model64, xi, xc, mode="trace", method="jacobian").cpu()
    got = out[idx][:, cols].double()
    scale = float(ref.abs().max())
    rec["check_rows"], rec["check_cols"] = idx.tolist(), cols.tolist()
    rec["max_rel_err"] = float((got - ref).abs().max()) / max(scale, 1e-30)
    rec["symmetry_max_abs_diff"] = float((out[idx][:, cols] - out[cols][:, idx].T).abs().max())
    rec["finite"] = bool(torch.isfinite(out[idx]).all())
    rec["tol"] = tol
    rec["ok"] = rec["max_rel_err"] <= tol and rec["finite"] and rec["symmetry_max_abs_diff"] == 0
    return rec


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-pin", action="store_true", help="pageable host memory for out")
    parser.add_argument("--checks", type=int, default=12, help="rows / columns recomputed")
    parser.add_argument("--tol", type=float, default=2e-4,
                        help="max error relative to the largest checked entry (float32)")
    parser.add_argument("--json", help="write the record here")
    args = parser.parse_args(argv)
    rec = run(args.n, args.device, not args.no_pin, args.checks, args.tol)
    print(json.dumps({k: v for k, v in rec.items() if k not in ("check_rows", "check_cols")},
                     indent=1))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rec, f, indent=1)
        print(f"wrote {args.json}")
    return 0 if rec["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
