"""timm models as their users build them: ``auto`` next to the Jacobian method and the torch.func
recipe in every mode, and what a call's fixed costs (probe, checks) take at small N.

Usage: python benchmarks/bench_timm.py [--models resnet18 ...] [--n 4 16] [--size 32]
                                       [--repeats 3] [--json out.json]

Each model from ``timm.create_model(name, num_classes=10)`` (random weights, eval mode),
float32, x2 = None, inputs ``(N, 3, size, size)``. In one process, per model and N, the methods
alternate for ``--repeats`` rounds and the median is kept:

- ``recipe``: the tutorial's ``vmap(jacrev(functional_call))`` and the einsum of the mode;
- ``jacobian`` and ``auto``: ``empirical_ntk(model, x, mode=..., method=...)``.

``fixed`` is the share of an ``auto`` call spent in the probe (``KernelPlan.__enter__``: the
probe forwards and the engine's choice) and in the checks of its blocks (``verify.check``),
timed inside the same calls. Before timing, auto's kernel is compared with the Jacobian's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
from torch.func import functional_call, jacrev, vmap

import torch_ntk
from torch_ntk.empirical import api, verify

MODELS = ["resnet18", "convnext_atto", "efficientnet_b0", "mobilenetv3_small_050",
          "regnetx_002", "vit_tiny_patch16_224", "deit_tiny_patch16_224"]
MODES = ["full", "trace", "diagonal"]
_EINSUM = {"full": "naf,mbf->nmab", "trace": "naf,maf->nm", "diagonal": "naf,maf->nma"}


def build(name: str, size: int):
    import timm
    torch.manual_seed(0)
    extra = {"img_size": size} if "patch16" in name else {}
    return timm.create_model(name, pretrained=False, num_classes=10, **extra).eval()


def recipe(model, x: torch.Tensor, mode: str) -> torch.Tensor:
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p, xi):
        return functional_call(model, p, (xi[None],))[0]

    jac = vmap(jacrev(f), (None, 0))(params, x)
    return sum(torch.einsum(_EINSUM[mode], j.flatten(2), j.flatten(2)) for j in jac.values())


class Timers:
    """Seconds spent in the probe and the checks, accumulated over calls."""

    def __init__(self) -> None:
        self.probe = self.checks = 0.0
        enter, check = api.KernelPlan.__enter__, verify.check

        def timed_enter(plan):
            start = time.perf_counter()
            try:
                return enter(plan)
            finally:
                self.probe += time.perf_counter() - start

        def timed_check(*args, **kwargs):
            start = time.perf_counter()
            try:
                return check(*args, **kwargs)
            finally:
                self.checks += time.perf_counter() - start

        api.KernelPlan.__enter__ = timed_enter
        api.verify.check = timed_check


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--n", nargs="+", type=int, default=[4, 16])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    timers = Timers()
    rows = []
    result = {"size": args.size, "dtype": "float32", "threads": torch.get_num_threads(),
              "torch": torch.__version__, "rows": rows}
    for name in args.models:
        model = build(name, args.size)
        for n in args.n:
            x = torch.randn(n, 3, args.size, args.size, generator=torch.Generator().manual_seed(n))
            ref = torch_ntk.empirical_ntk(model, x, method="jacobian")
            got = torch_ntk.empirical_ntk(model, x)
            error = float((got - ref).abs().max() / ref.abs().max())
            for mode in MODES:
                fns = {"recipe": lambda: recipe(model, x, mode),
                       "jacobian": lambda: torch_ntk.empirical_ntk(model, x, mode=mode,
                                                                   method="jacobian"),
                       "auto": lambda: torch_ntk.empirical_ntk(model, x, mode=mode)}
                for fn in fns.values():
                    fn()
                times = {k: [] for k in fns}
                for _ in range(args.repeats):
                    for k, fn in fns.items():
                        if k == "auto":
                            timers.probe = timers.checks = 0.0
                        times[k].append(median_time(fn, 1))
                        if k == "auto":
                            fixed = (timers.probe + timers.checks) / times[k][-1]
                row = {"model": name, "n": n, "mode": mode, "error": error,
                       **{k: statistics.median(v) for k, v in times.items()}, "fixed": fixed}
                row["auto_over_best"] = min(row["recipe"], row["jacobian"]) / row["auto"]
                rows.append(row)
                print(f"{name:24s} N={n:3d} {mode:8s} recipe {row['recipe']:.3f} s  jacobian "
                      f"{row['jacobian']:.3f} s  auto {row['auto']:.3f} s  best/auto "
                      f"{row['auto_over_best']:.2f}x  fixed {fixed:.0%}  (error {error:.1e})",
                      flush=True)
                if args.json:     # after every row: a long run cut short keeps what it has
                    with open(args.json, "w") as fh:
                        json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
