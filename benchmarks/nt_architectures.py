"""Reference infinite-width kernels of neural-tangents 0.6.5 (``stax``) for ``analytic_ntk(model, x)``.

Runs ONLY under the Python of a neural-tangents environment (JAX 0.4.23 on CPU, neural-tangents
0.6.5; it imports jax, neural_tangents and numpy, never torch). The recipe for that environment
is in the docstring of ``benchmarks/bench_neural_tangents.py``.

For every architecture of ``ARCHITECTURES`` it builds the ``stax`` twin (NTK parameterisation,
float64), draws ``x1`` (5 samples) and ``x2`` (3 samples) with ``numpy.random.default_rng(i)``
(standard normal, PyTorch layout), and writes one ``.npz`` with, per architecture ``i``:

- ``spec_i``: JSON string ``{"name", "input_shape", "layers"}`` (layer grammar below);
- ``x1_i``, ``x2_i``: the inputs in PyTorch layout, ``(N, C, H, W)`` / ``(N, C, L)`` / ``(N, D)``;
- ``nngp_sym_i``, ``ntk_sym_i``: ``kernel_fn(x1, None, ('nngp', 'ntk'))``, shape ``(5, 5)``;
- ``nngp_i``, ``ntk_i``: ``kernel_fn(x1, x2, ('nngp', 'ntk'))``, shape ``(5, 3)``;

plus ``count`` and ``versions`` (JSON: jax, neural_tangents, numpy). The kernels are per output
(NT's output kernel does not depend on the width of the last layer).

``input_shape`` is PyTorch's without the batch: ``(C, H, W)`` for 2-D, ``(C, L)`` for 1-D,
``(D,)`` for dense. Layers are plain JSON lists:

- ``["conv", out_channels, kernel_size, stride, "same" | "valid", w_std, b_std]``: 1-D or 2-D
  from the input; kernel_size and stride an int or a list (``[kh, kw]``); ``b_std == 0``
  means no bias. ``"same"`` only with stride 1 (as in PyTorch); for an even kernel the extra
  zero goes at the end (bottom / right), as both lax and PyTorch do.
- ``["dense", out_features, w_std, b_std]`` (``b_std == 0``: no bias).
- ``["relu"]``, ``["erf"]`` (``erf(x)``), ``["gelu"]`` (exact, ``x * Phi(x)``),
  ``["leaky_relu", alpha]``, ``["identity"]``.
- ``["avgpool", window, stride]``: VALID, divides by the window size (a stride must be given:
  stax's default stride is 1, PyTorch's is the window).
- ``["gap"]``: global average pooling over all spatial positions (``stax.GlobalAvgPool``).
- ``["flatten"]``.
- ``["layernorm"]``: normalises over all non-batch axes (channels and positions, like
  ``torch.nn.LayerNorm((C, H, W))`` on NCHW), no affine; stax's eps is 1e-12. stax only has
  its kernel for Gaussian inputs, i.e. directly after a conv / dense (or another layernorm).
- ``["residual", [layers...]]``: ``x + block(x)``. stax's ``FanInSum`` needs both summands
  Gaussian, so the input of the residual must be the output of a conv / dense and the block
  must end with one (a pre-activation block: ``[relu, conv, relu, conv]``).

Usage (from the repository root, with the environment's Python)::

    ntenv/bin/python benchmarks/nt_architectures.py [--out tests/data/nt_architectures.npz]
    ntenv/bin/python benchmarks/nt_architectures.py --time-myrtle 128 [--batch-sizes 0 16 32 64]

``--time-myrtle N`` times ``kernel_fn(x, None, get='ntk')`` of the "myrtle" benchmark network on
N random 8x8x1 images (float64) instead, unbatched (``jax.jit``) and with ``nt.batch``, and
prints JSON; each batch size runs in its own process so that its peak RSS is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

N1, N2 = 5, 3
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "tests", "data", "nt_architectures.npz")

# The benchmark network "myrtle" (input (1, 8, 8)); C is irrelevant in the limit.
_C = 16
MYRTLE = ("myrtle", (1, 8, 8), [
    ["conv", _C, 3, 1, "same", 1.0, 0.0], ["relu"],
    ["conv", _C, 3, 1, "same", 1.0, 0.0], ["relu"],
    ["avgpool", 2, 2],
    ["conv", _C, 3, 1, "same", 1.0, 0.0], ["relu"],
    ["avgpool", 2, 2],
    ["gap"],
    ["dense", 1, 1.0, 0.0],
])

# (name, input_shape (PyTorch layout, no batch), layers)
ARCHITECTURES = [
    # 1. pool-free CNN: NT keeps only the same-position covariances (diagonal spatial)
    ("conv_same_relu_x2", (2, 6, 6), [
        ["conv", 8, 3, 1, "same", 1.0, 0.0], ["relu"],
        ["conv", 8, 3, 1, "same", 1.0, 0.0], ["relu"],
        ["flatten"], ["dense", 1, 1.0, 0.0]]),
    # 2. strided VALID conv, erf, SAME conv, with biases; non-square image
    ("conv_valid_s2_erf", (3, 7, 8), [
        ["conv", 8, 3, 2, "valid", 1.2, 0.1], ["erf"],
        ["conv", 8, 3, 1, "same", 1.0, 0.2],
        ["flatten"], ["dense", 2, 1.0, 0.1]]),
    # 3. non-square kernel and stride, gelu; then an even kernel with SAME padding
    ("conv_rect_gelu", (2, 7, 8), [
        ["conv", 8, [3, 2], [1, 2], "valid", 1.0, 0.1], ["gelu"],
        ["conv", 8, [2, 3], 1, "same", 1.3, 0.0], ["gelu"],
        ["flatten"], ["dense", 1, 1.0, 0.0]]),
    # 4. 1-D convs, avgpool (odd length: VALID drops the last position), gap
    ("conv1d_pool_gap", (2, 13), [
        ["conv", 8, 3, 1, "same", 1.0, 0.1], ["relu"],
        ["conv", 8, 5, 2, "valid", 1.0, 0.1], ["relu"],
        ["avgpool", 2, 2], ["gap"], ["dense", 1, 1.0, 0.0]]),
    # 5. pooling: NT keeps all position pairs
    ("conv_pool_conv_gap", (2, 8, 8), [
        ["conv", 8, 3, 1, "same", 1.0, 0.0], ["relu"],
        ["avgpool", 2, 2],
        ["conv", 8, 3, 1, "same", 1.0, 0.1], ["relu"],
        ["gap"], ["dense", 1, 1.0, 0.0]]),
    # 5b. overlapping pooling window (3, stride 2) and a 1-D pool-free net with erf
    ("conv_overlap_pool", (1, 7, 7), [
        ["conv", 8, 2, 1, "valid", 1.0, 0.0], ["relu"],
        ["avgpool", 3, 2], ["flatten"], ["dense", 1, 1.0, 0.0]]),
    ("conv1d_erf_flatten", (3, 10), [
        ["conv", 8, 3, 1, "same", 1.5, 0.3], ["erf"],
        ["conv", 8, 4, 2, "valid", 1.0, 0.0], ["erf"],
        ["flatten"], ["dense", 1, 1.0, 0.0]]),
    # 6. residual blocks (pre-activation: stax's FanInSum needs Gaussian summands)
    ("conv_residual", (2, 6, 6), [
        ["conv", 8, 3, 1, "same", 1.0, 0.0],
        ["residual", [["relu"], ["conv", 8, 3, 1, "same", 1.0, 0.0],
                      ["relu"], ["conv", 8, 3, 1, "same", 1.0, 0.0]]],
        ["relu"], ["flatten"], ["dense", 1, 1.0, 0.0]]),
    ("dense_residual", (6,), [
        ["dense", 16, 1.0, 0.1],
        ["residual", [["relu"], ["dense", 16, 1.0, 0.1], ["relu"], ["dense", 16, 1.2, 0.0]]],
        ["residual", [["erf"], ["dense", 16, 0.8, 0.2]]],
        ["relu"], ["dense", 1, 1.0, 0.0]]),
    # 7. layernorm
    ("dense_layernorm", (6,), [
        ["dense", 16, 1.0, 0.2], ["layernorm"], ["relu"],
        ["dense", 16, 1.0, 0.0], ["relu"], ["dense", 1, 1.0, 0.0]]),
    ("conv_layernorm", (2, 6, 6), [
        ["conv", 8, 3, 1, "same", 1.0, 0.1], ["layernorm"], ["relu"],
        ["conv", 8, 3, 1, "valid", 1.0, 0.0], ["relu"],
        ["flatten"], ["dense", 1, 1.0, 0.0]]),
    ("conv_layernorm_gap", (2, 6, 6), [
        ["conv", 8, 3, 1, "same", 1.0, 0.0], ["layernorm"], ["relu"],
        ["avgpool", 2, 2], ["gap"], ["dense", 1, 1.0, 0.0]]),
    # 8. leaky relu, w_std 1.5 / b_std 0.3
    ("conv_leaky_relu", (2, 6, 6), [
        ["conv", 8, 3, 1, "same", 1.5, 0.3], ["leaky_relu", 0.1],
        ["conv", 8, 3, 1, "valid", 1.5, 0.3], ["leaky_relu", 0.1],
        ["flatten"], ["dense", 2, 1.5, 0.3]]),
    ("dense_leaky_relu", (5,), [
        ["dense", 16, 1.5, 0.3], ["leaky_relu", 0.1],
        ["dense", 16, 1.5, 0.3], ["leaky_relu", 0.1],
        ["dense", 1, 1.5, 0.3]]),
    # 9. the benchmark network
    MYRTLE,
    # 10. plain MLPs
    ("mlp_relu", (6,), [
        ["dense", 16, 1.0, 0.2], ["relu"],
        ["dense", 16, 1.0, 0.2], ["relu"],
        ["dense", 1, 1.0, 0.2]]),
    ("mlp_gelu_identity", (4,), [
        ["dense", 16, 1.1, 0.1], ["gelu"],
        ["dense", 16, 0.9, 0.0], ["identity"],
        ["dense", 16, 1.0, 0.3], ["erf"],
        ["dense", 1, 1.0, 0.0]]),
]


# Building the stax networks

def _pair(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (int(v),) * n


def _dimension_numbers(n_spatial: int) -> tuple[str, str, str]:
    if n_spatial == 1:
        return ("NWC", "WIO", "NWC")
    if n_spatial == 2:
        return ("NHWC", "HWIO", "NHWC")
    raise ValueError(f"only 1-D and 2-D convolutions, got {n_spatial} spatial axes")


def build(stax, input_shape, layers):
    """The ``stax.serial`` of ``layers`` for inputs of PyTorch shape ``input_shape``."""
    n_spatial = len(input_shape) - 1
    return stax.serial(*_layers(stax, n_spatial, layers))


def _layers(stax, n_spatial: int, layers) -> list:
    out = []
    spatial = n_spatial   # spatial axes left (0 after flatten / gap)
    for layer in layers:
        kind, args = layer[0], layer[1:]
        if kind == "conv":
            out_ch, k, s, pad, w_std, b_std = args
            if pad == "same" and any(v != 1 for v in _pair(s, spatial)):
                raise ValueError(f"{layer!r}: 'same' padding only with stride 1 (as in PyTorch)")
            out.append(stax.Conv(out_ch, _pair(k, spatial), _pair(s, spatial),
                                 padding={"same": "SAME", "valid": "VALID"}[pad],
                                 W_std=w_std, b_std=b_std or None,
                                 dimension_numbers=_dimension_numbers(spatial)))
        elif kind == "dense":
            out_f, w_std, b_std = args
            out.append(stax.Dense(out_f, W_std=w_std, b_std=b_std or None))
        elif kind == "relu":
            out.append(stax.Relu())
        elif kind == "erf":
            out.append(stax.Erf())
        elif kind == "gelu":
            out.append(stax.Gelu(approximate=False))
        elif kind == "leaky_relu":
            out.append(stax.LeakyRelu(args[0]))
        elif kind == "identity":
            out.append(stax.Identity())
        elif kind == "avgpool":
            window, stride = args
            out.append(stax.AvgPool(_pair(window, spatial), _pair(stride, spatial),
                                    padding="VALID"))
        elif kind == "gap":
            out.append(stax.GlobalAvgPool())
            spatial = 0
        elif kind == "flatten":
            out.append(stax.Flatten())
            spatial = 0
        elif kind == "layernorm":
            out.append(stax.LayerNorm(axis=tuple(range(1, spatial + 2)), channel_axis=-1))
        elif kind == "residual":
            block = stax.serial(*_layers(stax, spatial, args[0]))
            out.append(stax.serial(stax.FanOut(2), stax.parallel(stax.Identity(), block),
                                   stax.FanInSum()))
        else:
            raise ValueError(f"unknown layer {layer!r}")
    return out


def to_nt_layout(x: np.ndarray) -> np.ndarray:
    """PyTorch (N, C, *spatial) to NT's channels-last (N, *spatial, C)."""
    return np.moveaxis(x, 1, -1) if x.ndim > 2 else x


def draw_inputs(input_shape, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x1 = rng.standard_normal((N1,) + tuple(input_shape))
    x2 = rng.standard_normal((N2,) + tuple(input_shape))
    return x1, x2


def _enable_x64() -> None:
    import jax
    jax.config.update("jax_enable_x64", True)


def reference(i: int, name: str, input_shape, layers) -> dict:
    """The npz entries of architecture ``i`` (float64)."""
    _enable_x64()
    import jax.numpy as jnp
    from neural_tangents import stax

    _, _, kernel_fn = build(stax, input_shape, layers)
    x1, x2 = draw_inputs(input_shape, seed=i)
    a, b = jnp.asarray(to_nt_layout(x1)), jnp.asarray(to_nt_layout(x2))
    sym = kernel_fn(a, None, ("nngp", "ntk"))
    cross = kernel_fn(a, b, ("nngp", "ntk"))
    spec = json.dumps(dict(name=name, input_shape=list(input_shape), layers=layers))
    out = {f"spec_{i}": np.array(spec), f"x1_{i}": x1, f"x2_{i}": x2,
           f"nngp_sym_{i}": np.asarray(sym.nngp), f"ntk_sym_{i}": np.asarray(sym.ntk),
           f"nngp_{i}": np.asarray(cross.nngp), f"ntk_{i}": np.asarray(cross.ntk)}
    for key in ("nngp_sym", "ntk_sym", "nngp", "ntk"):
        v = out[f"{key}_{i}"]
        want = (N1, N1) if key.endswith("sym") else (N1, N2)
        if v.shape != want or v.dtype != np.float64 or not np.all(np.isfinite(v)):
            raise RuntimeError(f"{name}: {key} has shape {v.shape}, dtype {v.dtype}")
    return out


def versions() -> dict:
    import jax
    import neural_tangents as nt
    return dict(jax=jax.__version__, neural_tangents=nt.__version__, numpy=np.__version__)


def write_references(path: str) -> dict:
    arrays: dict = {}
    for i, (name, input_shape, layers) in enumerate(ARCHITECTURES):
        arrays.update(reference(i, name, input_shape, layers))
        print(f"{i:2d} {name}: ntk_sym[0, 0] = {arrays[f'ntk_sym_{i}'][0, 0]:.6f}", flush=True)
    arrays["count"] = np.array(len(ARCHITECTURES))
    arrays["versions"] = np.array(json.dumps(versions()))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, **arrays)
    print(f"wrote {path} ({os.path.getsize(path) / 1024:.1f} KiB, {len(ARCHITECTURES)} networks)")
    return arrays


# Timing of the benchmark network

def _block(tree):
    import jax
    for leaf in jax.tree_util.tree_leaves(tree):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    return tree


def _time_one(n: int, batch_size: int, repeats: int) -> dict:
    """Times ``kernel_fn(x, None, get='ntk')`` of myrtle on n images, in this process."""
    _enable_x64()
    import jax
    import jax.numpy as jnp
    import neural_tangents as nt
    from neural_tangents import stax

    _, input_shape, layers = MYRTLE
    _, _, kernel_fn = build(stax, input_shape, layers)
    x = jnp.asarray(to_nt_layout(np.random.default_rng(0).standard_normal((n,) + input_shape)))
    if batch_size:
        # nt.batch jits kernel_fn itself (its docstring: no jax.jit around or inside).
        fn = nt.batch(kernel_fn, batch_size=batch_size, store_on_device=False)
    else:
        fn = jax.jit(kernel_fn, static_argnames="get")
    start = time.perf_counter()
    k = _block(fn(x, None, get="ntk"))
    first = time.perf_counter() - start
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        _block(fn(x, None, get="ntk"))
        times.append(time.perf_counter() - start)
    return dict(batch_size=batch_size, first_call_s=first, seconds=statistics.median(times),
                seconds_all=times, shape=list(k.shape), dtype=str(k.dtype),
                ntk_00=float(np.asarray(k)[0, 0]),
                peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)


def nt_time_myrtle(n: int = 128, batch_sizes=(0, 16, 32, 64), repeats: int = 3,
                   isolate: bool = True) -> dict:
    """NT's NTK of myrtle on n 8x8x1 images (float64, x2=None): first call and median per batch size.

    ``batch_size`` 0 is ``jax.jit(kernel_fn, static_argnames='get')``; otherwise
    ``nt.batch(kernel_fn, batch_size=b, store_on_device=False)`` (n must be a multiple of b).
    With ``isolate`` each batch size runs in a fresh process, so peak_rss_gib (getrusage's
    ru_maxrss) is that configuration's own; without it the peak is cumulative.
    """
    rows = []
    load_before = list(os.getloadavg())
    for b in batch_sizes:
        if b and n % b:
            rows.append(dict(batch_size=b, skipped=f"{n} is not a multiple of {b}"))
            continue
        if isolate:
            cmd = [sys.executable, os.path.abspath(__file__), "--time-myrtle", str(n),
                   "--batch-sizes", str(b), "--repeats", str(repeats), "--no-isolate"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                rows.append(dict(batch_size=b, skipped=f"exit {proc.returncode}: "
                                 + proc.stderr.strip()[-500:]))
            else:
                rows.extend(json.loads(proc.stdout)["rows"])
        else:
            rows.append(_time_one(n, b, repeats))
    return dict(net="myrtle", n=n, input_shape_nhwc=[8, 8, 1], get="ntk", dtype="float64",
                repeats=repeats, versions=versions(), cpu_count=os.cpu_count(),
                load_before=load_before, load_after=list(os.getloadavg()), rows=rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="the .npz to write")
    parser.add_argument("--time-myrtle", type=int, default=None, metavar="N",
                        help="time NT on the myrtle network with N inputs instead; print JSON")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[0, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-isolate", action="store_true",
                        help="with --time-myrtle: all batch sizes in this process")
    args = parser.parse_args(argv)
    _enable_x64()
    if args.time_myrtle is not None:
        print(json.dumps(nt_time_myrtle(args.time_myrtle, tuple(args.batch_sizes), args.repeats,
                                        isolate=not args.no_isolate), indent=1))
    else:
        write_references(args.out)


if __name__ == "__main__":
    main()
