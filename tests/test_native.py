"""The native gram_sum ops (C++ and CUDA) against the pure-torch twin ``_gram_sum_torch``."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from torch_ntk import native
from torch_ntk.native import loader, route
from torch_ntk.native.gram import _gram_sum_torch, gram_sum

MODES = ("full", "trace", "diagonal")
DTYPES = (torch.float32, torch.float64)
# Relative to the largest entry of the float64 reference.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}

needs_native = pytest.mark.skipif(
    loader._C is None, reason=f"torch_ntk._C did not load: {loader.LOAD_ERROR}")
_CUDA_OK = torch.cuda.is_available() and loader.cuda_version() > 0
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(
        not _CUDA_OK, reason="needs a CUDA device and the CUDA kernel compiled in")),
]

# (N1, N2, K, p per layer, q per layer): awkward sizes, p = 0 and q = 0 layers, 0 to 14 layers.
CASES = [
    (1, 1, 1, [3], [2]),
    (7, 33, 3, [5, 0, 4], [3, 2, 1]),
    (33, 7, 10, [0], [7]),
    (257, 33, 2, [9, 1, 0, 13, 2, 5], [3, 11, 1, 4, 7, 2]),
    (70, 257, 1, [31], [17]),
    (5, 6, 3, [], []),
    (9, 11, 2, [1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2], [2, 1, 0, 3, 2, 1, 1, 3, 2, 1, 2, 3, 1, 2]),
]


def _random_case(seed: int):
    g = torch.Generator().manual_seed(seed)

    def ri(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    n_layers = ri(1, 6)
    return (ri(1, 300), ri(1, 300), ri(1, 10), [ri(0, 25) for _ in range(n_layers)],
            [ri(1, 25) for _ in range(n_layers)])


CASES += [_random_case(seed) for seed in range(3)]


def _factors(n, k, ps, qs, dtype, device, seed):
    """h (N, p) and d (N, K, q) per layer; every other d is a non-contiguous (K, N, q) transpose."""
    g = torch.Generator().manual_seed(seed)
    h = [torch.randn(n, p, generator=g, dtype=torch.float64).to(device, dtype) for p in ps]
    d = []
    for l, q in enumerate(qs):
        t = torch.randn(k, n, q, generator=g, dtype=torch.float64).to(device, dtype)
        d.append(t.transpose(0, 1) if l % 2 else t.transpose(0, 1).contiguous())
    return h, d


def _shape(mode, n1, n2, k):
    return {"full": (n1, n2, k, k), "trace": (n1, n2), "diagonal": (n1, n2, k)}[mode]


def _reference(h1, h2, d1, d2, c, mode, n1, n2, k, symmetric=False):
    """float64 pure-torch result on the same factors."""
    f64 = [[t.double() for t in ts] for ts in (h1, h2, d1, d2)]
    out = torch.empty(_shape(mode, n1, n2, k), dtype=torch.float64, device=h1[0].device
                      if h1 else "cpu")
    return _gram_sum_torch(*f64, c, mode=mode, out=out, symmetric=symmetric)


def _assert_close(actual, expected, rel, what):
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, 1.0)
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rel,
                               atol=rel * scale, msg=lambda m: f"{what}: {m}")


@pytest.fixture(autouse=True)
def _exact_cuda_matmuls():
    """CUDA float32 cases run the exact FMA kernel unless a test allows TF32 itself."""
    with _tf32(False):
        yield


def _mirror(t, mode):
    return t.permute(1, 0, 3, 2) if mode == "full" else t.transpose(0, 1)


@needs_native
@pytest.mark.parametrize("symmetric", [False, True], ids=["distinct", "symmetric"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_torch_into_slice(device, dtype, mode, case, symmetric):
    n1, n2, k, ps, qs = case
    n2 = n1 if symmetric else n2
    c = [0.5 + l for l in range(len(ps))]
    h1, d1 = _factors(n1, k, ps, qs, dtype, device, seed=1)
    h2, d2 = (h1, d1) if symmetric else _factors(n2, k, ps, qs, dtype, device, seed=2)
    big = torch.full((n1 + 6, n2 + 9) + _shape(mode, n1, n2, k)[2:], float("nan"),
                     dtype=dtype, device=device)
    out = big[3:3 + n1, 5:5 + n2]
    if symmetric:
        torch.ops.torch_ntk.gram_sum_sym_out(h1, d1, c, mode, out)
    else:
        torch.ops.torch_ntk.gram_sum_out(h1, h2, d1, d2, c, mode, out)
    ref = _reference(h1, h2, d1, d2, c, mode, n1, n2, k, symmetric)
    _assert_close(out, ref, TOL[dtype], f"native {device} {mode} {dtype} sym={symmetric}")
    outside = big.clone()
    outside[3:3 + n1, 5:5 + n2] = 0
    assert outside.isnan().sum() == big.numel() - out.numel(), "wrote outside the out slice"
    if symmetric:
        assert torch.equal(out, _mirror(out, mode)), "symmetric result is not exactly symmetric"


@needs_native
@pytest.mark.parametrize("symmetric", [False, True], ids=["distinct", "symmetric"])
@pytest.mark.parametrize("k,q", [(1, 300_007), (3, 280_001)])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_wide_gradients_of_few_samples_on_cpu(dtype, mode, k, q, symmetric):
    """One tile of a few samples with wide per-sample gradients: the trace's long reductions
    are split over the threads and the diagonal's GEMMs run in parallel (both layouts of d:
    contiguous, and a (K, N, q) transpose)."""
    n1, n2 = 5, 5 if symmetric else 3
    h1, d1 = _factors(n1, k, [0, 3], [q, q // 2], dtype, "cpu", seed=4)
    h2, d2 = (h1, d1) if symmetric else _factors(n2, k, [0, 3], [q, q // 2], dtype, "cpu",
                                                   seed=5)
    c = [1.0, 0.5]
    out = torch.empty(_shape(mode, n1, n2, k), dtype=dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        if symmetric:
            torch.ops.torch_ntk.gram_sum_sym_out(h1, d1, c, mode, out)
        else:
            torch.ops.torch_ntk.gram_sum_out(h1, h2, d1, d2, c, mode, out)
    finally:
        torch.set_num_threads(threads)
    ref = _reference(h1, h2, d1, d2, c, mode, n1, n2, k, symmetric)
    _assert_close(out, ref, TOL[dtype], f"wide {mode} {dtype} K={k} sym={symmetric}")
    if symmetric:
        assert torch.equal(out, _mirror(out, mode)), "symmetric result is not exactly symmetric"


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_gram_sum_takes_the_route_and_agrees(device):
    """On CPU the native op must run; on CUDA whichever backend the route names must run."""
    h, d = _factors(40, 4, [6, 0], [5, 3], torch.float64, device, seed=3)
    c = [1.0, 1.0]
    dev = torch.device(device).type
    assert route.native_available(dev)
    for mode in MODES:
        for symmetric in (False, True):
            out = torch.empty(_shape(mode, 40, 40, 4), dtype=torch.float64, device=device)
            expected = "native" if dev == "cpu" else route.backend(out)
            before = route.calls[expected, dev]
            gram_sum(h, h, d, d, c, mode=mode, out=out, symmetric=symmetric)
            assert route.calls[expected, dev] == before + 1, f"{expected} did not run"
            ref = _reference(h, h, d, d, c, mode, 40, 40, 4, symmetric)
            _assert_close(out, ref, 1e-10, f"gram_sum {device} {mode} sym={symmetric}")


def _opcheck_samples(device):
    samples = []
    for i, (n1, n2, k, ps, qs) in enumerate([(5, 3, 2, [3, 0], [4, 2]), (4, 4, 1, [2], [3]),
                                             (6, 2, 3, [], [])]):
        for mode in MODES:
            h1, d1 = _factors(n1, k, ps, qs, torch.float64, device, seed=i)
            h2, d2 = _factors(n2, k, ps, qs, torch.float64, device, seed=i + 10)
            c = [1.0] * len(ps)
            out = torch.zeros(_shape(mode, n1, n2, k), dtype=torch.float64, device=device)
            samples.append(("gram_sum_out", (h1, h2, d1, d2, c, mode, out)))
            out_sym = torch.zeros(_shape(mode, n1, n1, k), dtype=torch.float64, device=device)
            samples.append(("gram_sum_sym_out", (h1, d1, c, mode, out_sym)))
    return samples


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for name, args in _opcheck_samples(device):
        torch.library.opcheck(getattr(torch.ops.torch_ntk, name).default, args)


@needs_native
@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_bad_inputs_name_the_argument(device):
    n1, n2, k = 4, 3, 2
    h1, h2 = [torch.randn(n1, 5, device=device)], [torch.randn(n2, 5, device=device)]
    d1, d2 = [torch.randn(n1, k, 6, device=device)], [torch.randn(n2, k, 6, device=device)]
    out = torch.empty(n1, n2, k, k, device=device)
    op = torch.ops.torch_ntk.gram_sum_out
    err = (RuntimeError, ValueError)
    with pytest.raises(err, match="mode must be one of"):
        op(h1, h2, d1, d2, [1.0], "bogus", out)
    with pytest.raises(err, match="one entry per layer"):
        op(h1, h2, d1, d2, [1.0, 2.0], "full", out)
    with pytest.raises(err, match=r"h2\[0\].*3 rows"):
        op(h1, [torch.randn(n2 + 1, 5, device=device)], d1, d2, [1.0], "full", out)
    with pytest.raises(err, match=r"d1\[0\].*3 dimensions"):
        op(h1, h2, [torch.randn(n1, 6, device=device)], d2, [1.0], "full", out)
    with pytest.raises(err, match=r"out must have 2 dimensions"):
        op(h1, h2, d1, d2, [1.0], "trace", out)
    with pytest.raises(err, match=r"layer 0|h1\[0\] and h2\[0\]"):
        op(h1, [torch.randn(n2, 4, device=device)], d1, d2, [1.0], "full", out)
    with pytest.raises(err, match="square"):
        torch.ops.torch_ntk.gram_sum_sym_out(h1, d1, [1.0], "full", out)
    if device == "cpu":
        with pytest.raises(RuntimeError, match=r"h1\[0\] must have out's dtype"):
            op([h1[0].double()], h2, d1, d2, [1.0], "full", out)


def test_disable_native_switch():
    with route.native_disabled():
        assert not route.native_available("cpu") and not route.native_available("cuda")
        assert native.info()["cpu"] is False and native.info()["disabled"] is True
        h, d = _factors(9, 2, [3], [4], torch.float64, "cpu", seed=4)
        out = torch.empty(9, 9, 2, 2, dtype=torch.float64)
        before = route.calls["torch", "cpu"]
        gram_sum(h, h, d, d, [1.0], mode="full", out=out)
        assert route.calls["torch", "cpu"] == before + 1
    _assert_close(out, _reference(h, h, d, d, [1.0], "full", 9, 9, 2), 1e-12, "pure torch")


def test_disable_native_env_is_read_at_import():
    code = ("import torch_ntk; i = torch_ntk.native.info(); "
            "assert i['disabled'] and not i['cpu'] and not i['cuda'], i")
    env = dict(os.environ, TORCH_NTK_DISABLE_NATIVE="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(os.environ.get("TORCH_NTK_NO_NATIVE") == "1",
                    reason="built with TORCH_NTK_NO_NATIVE=1")
def test_info_reports_cpu_kernel():
    info = native.info()
    assert info["cpu"], f"native CPU kernel missing: {info['load_error']}"
    assert set(info) >= {"cpu", "cuda", "cuda_arch"}
    assert info["cuda"] == (loader.cuda_version() > 0)
    assert all(isinstance(a, str) for a in info["cuda_arch"])


# Tensor-core paths of the CUDA kernel (TF32 for float32 factors when torch allows TF32 matmuls,
# BF16 for bfloat16 factors), judged against the float64 result on the same factors.
needs_cuda = pytest.mark.skipif(not _CUDA_OK,
                                reason="needs a CUDA device and the CUDA kernel compiled in")
# (N1, N2, K, p per layer, q per layer): not multiples of the 64 x 64 tile, p = 0 layers, K = 1.
MMA_CASES = [
    (1, 1, 1, [3], [2]),
    (7, 1, 10, [5, 0, 4], [3, 2, 1]),
    (33, 257, 10, [0, 17], [7, 40]),
    (257, 33, 1, [64, 0, 37], [129, 64, 10]),
    (257, 7, 10, [64, 0], [129, 10]),
]
# Elementwise bound on |native - float64| relative to B = Σ_l (|h1||h2|ᵀ + |c|) ⊙ (|d1||d2|ᵀ):
# TF32 rounds each factor to 10 mantissa bits (u = 2^-11), so each Gram is off by at most about
# 2u of its |.|-bound and the product by about 4u, plus float32 accumulation: 2^-8 covers it.
# BF16 products are exact in float32, only the accumulation errs: 2^-10. A wrong element (a
# missed k-chunk, row or layer) is off by a sizeable fraction of the entry, far above both.
MMA_BOUND = {"tf32": 2.0 ** -8, "bf16": 2.0 ** -10}


def _abs_reference(h1, h2, d1, d2, c, mode, n1, n2, k):
    return _reference([t.abs() for t in h1], [t.abs() for t in h2], [t.abs() for t in d1],
                      [t.abs() for t in d2], [abs(v) for v in c], mode, n1, n2, k)


def _run_native(h1, h2, d1, d2, c, mode, n1, n2, k, symmetric):
    """The op into a NaN-filled strided slice; checks nothing outside it was written."""
    big = torch.full((n1 + 3, n2 + 5) + _shape(mode, n1, n2, k)[2:], float("nan"),
                     dtype=torch.float32, device="cuda")
    out = big[2:2 + n1, 1:1 + n2]
    if symmetric:
        torch.ops.torch_ntk.gram_sum_sym_out(h1, d1, c, mode, out)
    else:
        torch.ops.torch_ntk.gram_sum_out(h1, h2, d1, d2, c, mode, out)
    outside = big.clone()
    outside[2:2 + n1, 1:1 + n2] = 0
    assert int(outside.isnan().sum()) == big.numel() - out.numel(), "wrote outside the out slice"
    assert not out.isnan().any(), "left part of out unwritten"
    if symmetric:
        assert torch.equal(out, _mirror(out, mode)), "symmetric result is not exactly symmetric"
    return out


@contextlib.contextmanager
def _tf32(allowed: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _mma_factors(n1, n2, k, ps, qs, dtype, symmetric):
    """Unit-scale factors (entries of Θ are O(layers)), rounded to dtype."""
    h1, d1 = _factors(n1, k, ps, qs, torch.float64, "cuda", seed=7)
    h1 = [t / max(t.shape[1], 1) ** 0.5 for t in h1]
    d1 = [t / max(t.shape[2], 1) ** 0.5 for t in d1]
    if symmetric:
        h2, d2 = h1, d1
    else:
        h2, d2 = _factors(n2, k, ps, qs, torch.float64, "cuda", seed=8)
        h2 = [t / max(t.shape[1], 1) ** 0.5 for t in h2]
        d2 = [t / max(t.shape[2], 1) ** 0.5 for t in d2]
    cast = lambda ts: [t.to(dtype) for t in ts]  # noqa: E731
    h1, d1 = cast(h1), cast(d1)
    h2, d2 = (h1, d1) if symmetric else (cast(h2), cast(d2))
    return h1, h2, d1, d2


@needs_native
@needs_cuda
@pytest.mark.parametrize("symmetric", [False, True], ids=["distinct", "symmetric"])
@pytest.mark.parametrize("case", MMA_CASES, ids=[f"case{i}" for i in range(len(MMA_CASES))])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_cuda_tensor_cores_vs_float64(precision, mode, case, symmetric):
    """Native TF32 / BF16 error vs float64: within an elementwise rounding bound, and at most
    2x the pure-torch path's error at the same precision (plus 1e-6 of the largest entry)."""
    n1, n2, k, ps, qs = case
    n2 = n1 if symmetric else n2
    c = [1.0, 0.5, 1.0][:len(ps)]
    dtype = torch.float32 if precision == "tf32" else torch.bfloat16
    h1, h2, d1, d2 = _mma_factors(n1, n2, k, ps, qs, dtype, symmetric)
    ref = _reference(h1, h2, d1, d2, c, mode, n1, n2, k, symmetric)  # exact on these factors
    bound = _abs_reference(h1, h2, d1, d2, c, mode, n1, n2, k)
    scale = max(float(ref.abs().max()), 1e-30)
    what = f"{precision} {mode} N=({n1}, {n2}) K={k} sym={symmetric}"

    with _tf32(precision == "tf32"):
        out = _run_native(h1, h2, d1, d2, c, mode, n1, n2, k, symmetric)
        shape = _shape(mode, n1, n2, k)
        out_torch = _gram_sum_torch(h1, h2, d1, d2, c, mode=mode, symmetric=symmetric,
                                    out=torch.empty(shape, dtype=dtype, device="cuda"))
    diff = (out.double() - ref).abs()
    worst = float((diff / (MMA_BOUND[precision] * bound + 1e-6 * scale)).max())
    assert worst <= 1.0, f"{what}: error {float(diff.max()):.3g} exceeds the rounding bound " \
                         f"(worst element at {worst:.2f}x of it)"

    err = float(diff.max())
    err_torch = float((out_torch.double() - ref).abs().max())
    if precision == "tf32":
        with _tf32(False):  # did cuBLAS really use TF32 here? (tiny shapes may run exact kernels)
            exact_torch = _gram_sum_torch(h1, h2, d1, d2, c, mode=mode, symmetric=symmetric,
                                          out=torch.empty(shape, dtype=dtype, device="cuda"))
        # Diagonal mode runs K small batched GEMMs in torch, which cuBLAS may keep partly
        # exact; the element-wise TF32 bound above is the check there.
        comparable = (out.numel() >= 1000 and mode != "diagonal"
                      and not torch.equal(exact_torch, out_torch))
    else:
        comparable = True
    if comparable:
        assert err <= 2 * err_torch + 1e-6 * scale, (
            f"{what}: native error {err:.3g} vs pure torch {err_torch:.3g} (scale {scale:.3g})")


@needs_native
@needs_cuda
@pytest.mark.parametrize("mode", MODES)
def test_cuda_tf32_follows_torch_switch(mode):
    """TF32 runs only when torch allows it (allow_tf32 or matmul precision "high"/"medium");
    otherwise the float32 result is exact to 1e-5 of the largest entry."""
    n, k, ps, qs = 257, 10, [64, 0, 37], [129, 64, 10]
    c = [1.0, 1.0, 0.5]
    h, _, d, _ = _mma_factors(n, n, k, ps, qs, torch.float32, symmetric=True)
    ref = _reference(h, h, d, d, c, mode, n, n, k)
    old_precision = torch.get_float32_matmul_precision()
    try:
        with _tf32(False):
            exact = _run_native(h, h, d, d, c, mode, n, n, k, False)
        _assert_close(exact, ref, 1e-5, f"exact float32 {mode}")
        with _tf32(True):
            tf32 = _run_native(h, h, d, d, c, mode, n, n, k, False)
        assert not torch.equal(tf32, exact), f"{mode}: allow_tf32=True did not switch to TF32"
        for precision in ("high", "medium"):
            torch.set_float32_matmul_precision(precision)
            again = _run_native(h, h, d, d, c, mode, n, n, k, False)
            assert torch.equal(again, tf32), f"{mode}: precision {precision!r} is not the TF32 path"
        torch.set_float32_matmul_precision("highest")
        assert torch.equal(_run_native(h, h, d, d, c, mode, n, n, k, False), exact), \
            f"{mode}: precision 'highest' is not the exact path"
    finally:
        torch.set_float32_matmul_precision(old_precision)


@needs_native
@needs_cuda
def test_cuda_bf16_many_layers_and_float64_unaffected():
    """BF16 over more layers than one launch holds (accumulating launches), and float64 factors
    staying exact with TF32 allowed."""
    n, k = 70, 3
    ps, qs = [3, 0, 5] * 5, [4, 2, 7] * 5  # 15 layers > kMaxLayers = 12
    c = [1.0] * len(ps)
    for mode in MODES:
        h, _, d, _ = _mma_factors(n, n, k, ps, qs, torch.bfloat16, symmetric=True)
        out = _run_native(h, h, d, d, c, mode, n, n, k, True)
        ref = _reference(h, h, d, d, c, mode, n, n, k, True)
        bound = _abs_reference(h, h, d, d, c, mode, n, n, k)
        assert float(((out.double() - ref).abs() - 2.0 ** -10 * bound).max()) <= 1e-6, \
            f"bf16 {mode} with 15 layers"
        h64, _, d64, _ = _mma_factors(n, n, k, ps, qs, torch.float64, symmetric=True)
        with _tf32(True):
            out64 = torch.empty(_shape(mode, n, n, k), dtype=torch.float64, device="cuda")
            torch.ops.torch_ntk.gram_sum_sym_out(h64, d64, c, mode, out64)
        _assert_close(out64, _reference(h64, h64, d64, d64, c, mode, n, n, k, True), 1e-10,
                      f"float64 {mode} with TF32 allowed")
