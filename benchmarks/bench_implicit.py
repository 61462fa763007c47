"""The kernel without its N×N matrix: random NTK features and the matrix-free operator.

Usage: python benchmarks/bench_implicit.py [--only NAME ...] [--quick] [--json out.json]

Each measurement runs in a fresh process (its own peak RSS):

- ``variance``: the relative Frobenius error of the kernel estimated from ``ntk_features``
  (count sketches computed from the factors) next to a dense Gaussian projection of the whole
  per-sample gradient (formed explicitly), at equal dim, mean over seeds; an MLP and a CNN.
- ``features_20m``: an MLP of 21M parameters, N = 64, K = 10, dim = 1024, float32 (its
  per-sample gradients would take 54 GB).
- ``features_100m``: an MLP of 101M parameters, N = 1000, K = 10, dim = 1024, float32.
- ``matvec_100k``: ``NTKOperator`` of an MLP (32 -> 512 -> 512 -> 1) on N = 100,000 inputs
  (the trace kernel would take 40 GB): one product.
- ``cg_100k``: kernel regression on N = 100,000 inputs through ``gradient_descent_mse(op,
  ...)`` with an MLP (32 -> 256 -> 256 -> 1) in float64 (float32 products can't resolve a
  residual of 1e-6 at this condition number), ``diag_reg=1e-3``, conjugate gradients to a
  relative residual of 1e-6 preconditioned by 1024 random features; predictions on 200 test
  inputs.
- ``eigsh_cnn``: the top 20 eigenvalues of the NTK of a small CNN on 10,000 digit-like 8×8
  images (scikit-learn's digits, shifted and noised) by ``scipy.sparse.linalg.eigsh``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

_HERE = os.path.abspath(__file__)


def variance(seeds: int = 8) -> dict:
    import torch
    from torch import nn
    from torch.func import functional_call, jacrev, vmap

    import torch_ntk

    torch.manual_seed(0)
    models = {
        "mlp": (nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                              nn.Linear(64, 3)), torch.randn(32, 16)),
        "cnn": (nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3),
                              nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 3)),
                torch.randn(32, 1, 8, 8)),
    }
    out = {}
    for name, (model, x) in models.items():
        model, x = model.double(), x.double()
        exact = torch_ntk.empirical_ntk(model, x)
        params = {k: v.detach() for k, v in model.named_parameters()}
        jac = vmap(jacrev(lambda p, xi: functional_call(model, p, (xi[None],))[0]),
                   in_dims=(None, 0))(params, x)
        g = torch.cat([j.reshape(x.shape[0], 3, -1) for j in jac.values()], dim=2)
        rows = {}
        for dim in (64, 256, 1024):
            sketch, dense = [], []
            for s in range(seeds):
                phi = torch_ntk.ntk_features(model, x, dim, seed=s)
                est = torch.einsum("nad,mbd->nmab", phi, phi)
                sketch.append(float((est - exact).norm() / exact.norm()))
                gen = torch.Generator().manual_seed(1000 + s)
                proj = torch.randn(g.shape[2], dim, generator=gen, dtype=g.dtype) / math.sqrt(dim)
                psi = g @ proj
                est = torch.einsum("nad,mbd->nmab", psi, psi)
                dense.append(float((est - exact).norm() / exact.norm()))
            rows[dim] = {"sketch": sum(sketch) / seeds, "dense_gaussian": sum(dense) / seeds,
                         "ratio": sum(sketch) / sum(dense)}
        out[name] = {"parameters": g.shape[2], "by_dim": rows}
    return out


def _mlp(widths: list[int], dtype):
    from torch import nn
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def features(widths: list[int], n: int, dim: int = 1024) -> dict:
    import torch

    import torch_ntk
    from torch_ntk.apps.bench.harness import peak_rss_gib

    torch.manual_seed(0)
    model = _mlp(widths, torch.float32)
    x = torch.randn(n, widths[0])
    count = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    phi = torch_ntk.ntk_features(model, x, dim)
    seconds = time.perf_counter() - start
    k = widths[-1]
    # A check that the features mean something: the trace kernel of 4 samples, estimated.
    exact = torch_ntk.empirical_ntk(model, x[:4], mode="trace")
    est = torch.einsum("nad,mad->nm", phi[:4], phi[:4])
    return {"parameters": count, "n": n, "k": k, "dim": dim, "seconds": seconds,
            "peak_rss_gib": peak_rss_gib(),
            "per_sample_gradients_gb": n * k * count * 4 / 1e9,
            "trace_error_4x4": float((est - exact).norm() / exact.norm())}


def _regression_data(n: int, seed: int):
    import torch
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=g)
    y = torch.sin(x[:, :4].sum(1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def matvec(n: int = 100_000) -> dict:
    import torch

    import torch_ntk
    from torch_ntk.apps.bench.harness import peak_rss_gib

    torch.manual_seed(0)
    model = _mlp([32, 512, 512, 1], torch.float32)
    x, _ = _regression_data(n, 1)
    start = time.perf_counter()
    op = torch_ntk.NTKOperator(model, x)
    setup = time.perf_counter() - start
    v = torch.randn(n)
    start = time.perf_counter()
    op @ v
    seconds = time.perf_counter() - start
    return {"n": n, "parameters": sum(p.numel() for p in model.parameters()),
            "setup_seconds": setup, "matvec_seconds": seconds, "peak_rss_gib": peak_rss_gib(),
            "kernel_gb": n * n * 4 / 1e9}


def cg(n: int = 100_000, tests: int = 200) -> dict:
    import torch

    import torch_ntk
    from torch_ntk import predict
    from torch_ntk.apps.bench.harness import peak_rss_gib

    torch.manual_seed(0)
    model = _mlp([32, 256, 256, 1], torch.float64)
    x, y = (t.double() for t in _regression_data(n, 1))
    xt, yt = (t.double() for t in _regression_data(tests, 2))
    start = time.perf_counter()
    op = torch_ntk.NTKOperator(model, x)
    fn = predict.gradient_descent_mse(op, y, diag_reg=1e-3, rtol=1e-6)
    k_test = torch_ntk.empirical_ntk(model, xt, x, mode="trace")
    pred = fn(None, None, torch.zeros(tests, 1, dtype=torch.float64), k_test)
    seconds = time.perf_counter() - start
    return {"n": n, "tests": tests, "seconds": seconds, "iterations": fn.last.iterations,
            "relative_residual": fn.last.residual, "kernel_vector_products": fn.last.matvecs,
            "test_rmse": float((pred - yt).pow(2).mean().sqrt()),
            "target_rms": float(yt.pow(2).mean().sqrt()), "peak_rss_gib": peak_rss_gib()}


def eigsh_cnn(n: int = 10_000, top: int = 20) -> dict:
    import numpy as np
    import torch
    from scipy.sparse.linalg import eigsh
    from sklearn.datasets import load_digits
    from torch import nn

    import torch_ntk
    from torch_ntk.apps.bench.harness import peak_rss_gib

    digits = torch.tensor(load_digits().images, dtype=torch.float32) / 16.0
    g = torch.Generator().manual_seed(0)
    picks = torch.randint(0, digits.shape[0], (n,), generator=g)
    shifts = torch.randint(-1, 2, (n, 2), generator=g)
    x = torch.stack([torch.roll(digits[i], tuple(s.tolist()), (0, 1))
                     for i, s in zip(picks, shifts)])[:, None]
    x = x + 0.05 * torch.randn(x.shape, generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 1))
    start = time.perf_counter()
    op = torch_ntk.NTKOperator(model, x)
    values = eigsh(op.to_scipy(), k=top, which="LA", return_eigenvectors=False, tol=1e-6)
    seconds = time.perf_counter() - start
    return {"n": n, "top": top, "seconds": seconds, "kernel_vector_products": op.matvecs,
            "eigenvalues": sorted(np.asarray(values).tolist(), reverse=True),
            "peak_rss_gib": peak_rss_gib()}


SUITE = {
    "variance": ("variance", {}),
    "features_20m": ("features", {"widths": [1024, 4096, 4096, 10], "n": 64}),
    "features_100m": ("features", {"widths": [2048, 8192, 8192, 2048, 10], "n": 1000}),
    "matvec_100k": ("matvec", {}),
    "cg_100k": ("cg", {}),
    "eigsh_cnn": ("eigsh_cnn", {}),
}
QUICK = {"features_100m": {"n": 100}, "matvec_100k": {"n": 20_000}, "cg_100k": {"n": 20_000},
         "eigsh_cnn": {"n": 2_000}}


def main(argv: list[str] | None = None) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))
    from torch_ntk.apps.bench.harness import load_average, run_isolated

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(SUITE), default=None)
    parser.add_argument("--quick", action="store_true", help="smaller N (a smoke run)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    results = {"load_average": load_average(), "threads": os.cpu_count(), "runs": {}}
    for name in args.only or SUITE:
        function, kwargs = SUITE[name]
        kwargs = {**kwargs, **(QUICK.get(name, {}) if args.quick else {})}
        result = run_isolated(f"{_HERE}:{function}", kwargs)
        results["runs"][name] = result
        print(name, json.dumps(result, indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
