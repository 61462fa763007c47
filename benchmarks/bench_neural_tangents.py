"""neural-tangents side by side with torch_ntk: the same networks and sizes, same machine.

Usage: python benchmarks/bench_neural_tangents.py --nt-python /path/to/ntenv/bin/python
       [--repeats 3] [--time-limit 600] [--json out.json]

Cases: the MLP 64-512-512-512-10 (ReLU) at N = 256 and 1024, full kernel and trace; the CNN of
PyTorch's NTK tutorial (three 3×3 convolutions of 32 channels, no padding, then a linear layer
to 10 outputs, 32×32×3 inputs) at N = 32 and 128, full kernel. float32, x2 = None. Same
architectures and sizes, not the same weights (the timings do not depend on the values).

- neural-tangents: ``jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes=() or (-1,),
  vmap_axes=0, implementation=NtkImplementation.STRUCTURED_DERIVATIVES))`` on a ``stax`` network
  (standard parameterisation); the first call (tracing and compiling) is reported apart, then
  the median of the repeats (``block_until_ready``). ``vmap_axes=0`` tells it that samples do
  not interact, which its structured implementation needs to be fast.
- torch_ntk: ``empirical_ntk(model, x, mode=..., method="structured")``, the timing of
  ``python -m torch_ntk bench`` (median after a warm-up).

Each measurement runs in its own process (neural-tangents under ``--nt-python``, so this
repository never imports JAX), alternating the two libraries case by case so that load from
other processes hits both alike; the 1-minute load average is recorded around each.

The neural-tangents environment (JAX 0.4.23 on CPU, neural-tangents 0.6.5)::

    python3 -m venv ntenv
    ntenv/bin/pip install "jax[cpu]==0.4.23" "jaxlib==0.4.23" frozendict "numpy<2" "scipy<1.13"
    ntenv/bin/pip install --no-deps neural-tangents==0.6.5
    # neural_tangents/__init__.py: delete the line "from . import experimental" (that
    # subpackage needs tensorflow, which the empirical kernels do not use)

``--no-deps`` keeps its pinned requirements from pulling in other JAX versions; scipy < 1.13
because jax 0.4.23 imports ``scipy.linalg.tril``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# (network, N, mode) of the comparison.
CASES = (("mlp", 256, "full"), ("mlp", 256, "trace"), ("mlp", 1024, "full"),
         ("mlp", 1024, "trace"), ("cnn", 32, "full"), ("cnn", 128, "full"))
_MLP_WIDTHS = (64, 512, 512, 512, 10)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nt-python", required=True,
                        help="Python interpreter of an environment with neural-tangents 0.6.5")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--time-limit", type=float, default=600.0,
                        help="seconds per measurement before it is reported as timed out")
    parser.add_argument("--cases", nargs="+", default=None,
                        help="subset as NET:N:MODE, e.g. mlp:256:full (default: all)")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args(argv)
    cases = [_parse_case(c) for c in args.cases] if args.cases else list(CASES)
    result = run(args.nt_python, cases, args.repeats, args.time_limit)
    print()
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return result


def run(nt_python: str, cases, repeats: int = 3, time_limit_s: float = 600.0) -> dict:
    """Times neural-tangents and torch_ntk on every case; returns the JSON-ready record."""
    from torch_ntk.apps.bench import harness
    from torch_ntk.apps.machine import machine_info
    versions = harness.run_isolated(f"{os.path.abspath(__file__)}:nt_versions",
                                    python=nt_python, timeout=time_limit_s)
    rows = []
    for net, n, mode in cases:
        row: dict = dict(net=net, n=n, mode=mode, load_before=harness.load_average())
        row["neural_tangents"] = harness.run_isolated(
            f"{os.path.abspath(__file__)}:nt_measure",
            dict(net=net, n=n, mode=mode, repeats=repeats), python=nt_python,
            timeout=time_limit_s)
        row["torch_ntk"] = harness.run_isolated(
            "torch_ntk.apps.bench.methods:measure",
            dict(model=net, method="structured", n=n, mode=mode, repeats=repeats),
            timeout=time_limit_s, env={"TORCH_NTK_DISABLE_NATIVE": None})
        row["load_after"] = harness.load_average()
        rows.append(row)
        print(_format_log(row), flush=True)
    return dict(machine=machine_info("cpu"), neural_tangents_env=versions, rows=rows)


def format_table(result: dict) -> str:
    """Markdown: per case, both libraries' time and peak RSS, and their ratio."""
    env = result["neural_tangents_env"]
    lines = [f"neural-tangents {env.get('neural_tangents', '?')} (jax {env.get('jax', '?')}, "
             "STRUCTURED_DERIVATIVES, vmap_axes=0, jit) vs torch_ntk structured", "",
             "| net | N | mode | neural-tangents (s) | first call incl. compile (s) | "
             "NT peak RSS (GiB) | torch_ntk (s) | torch_ntk peak RSS (GiB) | NT / torch_ntk | "
             "load avg |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        nt, ours = r["neural_tangents"], r["torch_ntk"]
        ratio = (f"{nt['seconds'] / ours['seconds']:.1f}x"
                 if "seconds" in nt and "seconds" in ours else "")
        lines.append(f"| {r['net']} | {r['n']} | {r['mode']} | {_cell(nt, 'seconds')} | "
                     f"{_cell(nt, 'first_call_s')} | {_cell(nt, 'peak_rss_gib', 2)} | "
                     f"{_cell(ours, 'seconds')} | {_cell(ours, 'peak_rss_gib', 2)} | {ratio} | "
                     f"{r['load_before']:.1f} -> {r['load_after']:.1f} |")
    return "\n".join(lines)


def nt_versions() -> dict:
    """Worker (neural-tangents environment): library versions and JAX's devices."""
    import jax
    import neural_tangents as nt
    return dict(jax=jax.__version__, neural_tangents=nt.__version__,
                devices=[str(d) for d in jax.devices()], python=sys.version.split()[0])


def nt_measure(net: str, n: int, mode: str, repeats: int = 3) -> dict:
    """Worker (neural-tangents environment): times one empirical NTK of ``net`` on N inputs.

    Returns:
        dict: seconds (median of the calls after the first), repeats, seconds_all,
        first_call_s (tracing + compiling + one call), peak_rss_gib, parameters, shape.
    """
    import statistics

    import jax
    import neural_tangents as nt
    from neural_tangents import stax

    init_fn, apply_fn, input_shape = _nt_network(stax, net)
    _, params = init_fn(jax.random.PRNGKey(0), (-1,) + input_shape)
    x = jax.random.normal(jax.random.PRNGKey(1), (n,) + input_shape, dtype="float32")
    kernel_fn = jax.jit(nt.empirical_ntk_fn(
        apply_fn, trace_axes=() if mode == "full" else (-1,), vmap_axes=0,
        implementation=nt.NtkImplementation.STRUCTURED_DERIVATIVES))
    start = time.perf_counter()
    k = kernel_fn(x, None, params).block_until_ready()
    first = time.perf_counter() - start
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        kernel_fn(x, None, params).block_until_ready()
        times.append(time.perf_counter() - start)
    return dict(seconds=statistics.median(times), repeats=len(times), seconds_all=times,
                first_call_s=first, shape=list(k.shape), dtype=str(k.dtype),
                parameters=int(sum(p.size for p in jax.tree_util.tree_leaves(params))),
                peak_rss_gib=_peak_rss_gib())


# Internal helpers

def _peak_rss_gib() -> float:
    """Peak resident memory of this program (Linux ``VmHWM``, which starts afresh at exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20
    raise OSError("VmHWM not in /proc/self/status")


def _nt_network(stax, net: str):
    """``(init_fn, apply_fn, input shape)`` of the stax twin of the torch model ``net``."""
    if net == "mlp":
        layers = []
        for width in _MLP_WIDTHS[1:-1]:
            layers += [stax.Dense(width, parameterization="standard"), stax.Relu()]
        layers.append(stax.Dense(_MLP_WIDTHS[-1], parameterization="standard"))
        return (*stax.serial(*layers)[:2], (_MLP_WIDTHS[0],))
    if net == "cnn":  # NHWC inputs; padding VALID like the torch model's Conv2d
        conv = [stax.Conv(32, (3, 3), padding="VALID", parameterization="standard")
                for _ in range(3)]
        init_fn, apply_fn, _ = stax.serial(
            conv[0], stax.Relu(), conv[1], stax.Relu(), conv[2], stax.Flatten(),
            stax.Dense(10, parameterization="standard"))
        return init_fn, apply_fn, (32, 32, 3)
    raise ValueError(f"unknown network {net!r}; expected 'mlp' or 'cnn'")


def _parse_case(text: str) -> tuple[str, int, str]:
    try:
        net, n, mode = text.split(":")
        return net, int(n), mode
    except ValueError:
        raise SystemExit(f"--cases: expected NET:N:MODE such as mlp:256:full, got {text!r}")


def _cell(res: dict, key: str, digits: int = 3) -> str:
    if "skipped" in res:
        return res["skipped"]
    return f"{res[key]:.{digits}f}"


def _format_log(row: dict) -> str:
    parts = []
    for lib in ("neural_tangents", "torch_ntk"):
        res = row[lib]
        parts.append(f"{lib} " + (res["skipped"] if "skipped" in res else
                                  f"{res['seconds']:.3f} s ({res['peak_rss_gib']:.2f} GiB)"))
    return f"{row['net']} N={row['n']} {row['mode']}: " + ", ".join(parts)


if __name__ == "__main__":
    main()
