"""analytic_ntk and NTKMLP: hand-derived values, closed forms vs the Hermite expansion, an
independent 2-D Gauss-Hermite reference, kernel properties, and wide NTKMLPs vs the limit."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import torch_ntk
from conftest import DEVICES

F64 = torch.float64
SMOOTH = ("tanh", "gelu", "sigmoid", "softplus")


def _sphere(n: int, d: int, radius: float | None = None) -> torch.Tensor:
    """n points of norm sqrt(d) (unit pre-activation variance) unless ``radius`` is given."""
    x = torch.randn(n, d, dtype=F64)
    return x / x.norm(dim=1, keepdim=True) * (math.sqrt(d) if radius is None else radius)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# Independent reference: 2-D Gauss-Hermite on the Cholesky factor, analytic derivatives.

_DERIVATIVES = {
    "tanh": (np.tanh, lambda u: 1 - np.tanh(u) ** 2),
    "sigmoid": (lambda u: 1 / (1 + np.exp(-u)), lambda u: np.exp(-u) / (1 + np.exp(-u)) ** 2),
    "softplus": (lambda u: np.logaddexp(0, u), lambda u: 1 / (1 + np.exp(-u))),
    "gelu": (lambda u: u * _ncdf(u),
             lambda u: _ncdf(u) + u * np.exp(-u * u / 2) / np.sqrt(2 * np.pi)),
}


def _ncdf(u):
    from scipy.special import ndtr
    return ndtr(u)


def _reference(x1, x2, depth, act, w_std, b_std, degree=200):
    f, df = _DERIVATIVES[act]
    z, w = np.polynomial.hermite_e.hermegauss(degree)
    w = w / w.sum()
    x1, x2 = x1.numpy(), x2.numpy()
    w2, b2, n0 = w_std ** 2, b_std ** 2, x1.shape[1]
    q1 = w2 * (x1 * x1).sum(1) / n0 + b2
    q2 = w2 * (x2 * x2).sum(1) / n0 + b2
    c = w2 * x1 @ x2.T / n0 + b2
    t = c.copy()

    def expect(g, h, s1, s2, rho):
        u = s1 * z[:, None]
        v = s2 * (rho * z[:, None] + np.sqrt(max(1 - rho * rho, 0.0)) * z[None, :])
        return float(np.sum(w[:, None] * w[None, :] * g(u) * h(v)))

    for _ in range(depth - 1):
        cn, dot = np.empty_like(c), np.empty_like(c)
        for i in range(c.shape[0]):
            for j in range(c.shape[1]):
                s1, s2 = math.sqrt(q1[i]), math.sqrt(q2[j])
                rho = min(1.0, max(-1.0, c[i, j] / (s1 * s2)))
                cn[i, j] = w2 * expect(f, f, s1, s2, rho) + b2
                dot[i, j] = w2 * expect(df, df, s1, s2, rho)
        q1 = np.array([w2 * expect(f, f, math.sqrt(q), math.sqrt(q), 1.0) + b2 for q in q1])
        q2 = np.array([w2 * expect(f, f, math.sqrt(q), math.sqrt(q), 1.0) + b2 for q in q2])
        t, c = t * dot + cn, cn
    return torch.from_numpy(c), torch.from_numpy(t)


# Hand-derived values

def test_depth_one_is_the_linear_kernel():
    x1, x2 = torch.randn(6, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    expected = 1.7 ** 2 * x1 @ x2.T / 4 + 0.3 ** 2
    for act in ("relu", "tanh", lambda v: v ** 3):
        k = torch_ntk.analytic_ntk(x1, x2, depth=1, activation=act, w_std=1.7, b_std=0.3,
                                   get=("nngp", "ntk"))
        torch.testing.assert_close(k.nngp, expected, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(k.ntk, expected, rtol=1e-14, atol=1e-14)


def test_depth_two_by_hand():
    # n0 = 2, w = 1, b = 0: q = 1 for both, cross covariance c = 1/sqrt(2), ρ = cos(π/4).
    x = torch.tensor([[math.sqrt(2), 0.0], [1.0, 1.0], [0.0, math.sqrt(2)]], dtype=F64)
    c = 1 / math.sqrt(2)
    k = torch_ntk.analytic_ntk(x, depth=2, activation="relu", get=("nngp", "ntk"))
    # arc-cosine: Σ2 = (sin θ + (π - θ) cos θ)/(2π), Σ̇2 = (π - θ)/(2π), θ = π/4 (and π/2).
    sigma = c * (1 + 3 * math.pi / 4) / (2 * math.pi)
    assert k.nngp[0, 1].item() == pytest.approx(sigma, rel=1e-14)
    assert k.ntk[0, 1].item() == pytest.approx(c * 3 / 8 + sigma, rel=1e-14)
    assert k.nngp[0, 2].item() == pytest.approx(1 / (2 * math.pi), rel=1e-14)
    assert k.ntk[0, 2].item() == pytest.approx(1 / (2 * math.pi), rel=1e-14)
    assert k.nngp[1, 1].item() == pytest.approx(0.5, rel=1e-14)
    assert k.ntk[1, 1].item() == pytest.approx(1.0, rel=1e-14)
    # erf: Σ2 = 2/π asin(2c / 3), Σ̇2 = 4/π / sqrt(9 - 4c²).
    k = torch_ntk.analytic_ntk(x, depth=2, activation="erf", get=("nngp", "ntk"))
    sigma, dot = 2 / math.pi * math.asin(2 * c / 3), 4 / math.pi / math.sqrt(9 - 4 * c * c)
    assert k.nngp[0, 1].item() == pytest.approx(sigma, rel=1e-14)
    assert k.ntk[0, 1].item() == pytest.approx(c * dot + sigma, rel=1e-14)


def test_identity_network_by_hand():
    x1, x2 = torch.randn(5, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    w2, b2 = 0.8 ** 2, 0.5 ** 2
    sigma = w2 * x1 @ x2.T / 3 + b2
    theta = sigma.clone()
    for _ in range(3):
        sigma = w2 * sigma + b2
        theta = w2 * theta + sigma
    k = torch_ntk.analytic_ntk(x1, x2, depth=4, activation="identity", w_std=0.8, b_std=0.5,
                               get=("nngp", "ntk"))
    torch.testing.assert_close(k.nngp, sigma, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(k.ntk, theta, rtol=1e-13, atol=1e-13)


# Closed forms vs the Hermite expansion, and the expansion vs an independent reference

@pytest.mark.parametrize("act,fn,tol", [
    ("identity", lambda v: v * 1.0, 1e-13),
    ("erf", lambda v: torch.erf(v), 1e-10),
    ("relu", lambda v: torch.relu(v), 5e-3),  # kink: the 1-D rule converges only like 1/n
])
@pytest.mark.parametrize("depth", [2, 4])
def test_closed_form_matches_hermite_expansion(act, fn, tol, depth):
    x1, x2 = _sphere(9, 5), _sphere(4, 5, radius=1.3)
    x2[0] = x1[0]
    closed = torch_ntk.analytic_ntk(x1, x2, depth=depth, activation=act, w_std=1.2, b_std=0.2,
                                    get=("nngp", "ntk"))
    series = torch_ntk.analytic_ntk(x1, x2, depth=depth, activation=fn, w_std=1.2, b_std=0.2,
                                    get=("nngp", "ntk"))
    for name in ("nngp", "ntk"):
        assert _rel(getattr(series, name), getattr(closed, name)) < tol, name


@pytest.mark.parametrize("act", SMOOTH)
@pytest.mark.parametrize("w_std,b_std", [(1.0, 0.1), (1.5, 0.05)])
def test_hermite_expansion_matches_2d_reference(act, w_std, b_std):
    x = _sphere(4, 6)
    x[1] = 0.999 * x[0] + 0.04 * x[2]  # nearly parallel pair
    x[3] = -x[2]  # anti-parallel pair
    k = torch_ntk.analytic_ntk(x, depth=3, activation=act, w_std=w_std, b_std=b_std,
                               get=("nngp", "ntk"))
    ref_nngp, ref_ntk = _reference(x, x, 3, act, w_std, b_std)
    assert _rel(k.nngp, ref_nngp) < 1e-7
    assert _rel(k.ntk, ref_ntk) < 1e-7


def test_quadrature_degree_controls_accuracy():
    x = _sphere(6, 4, radius=2 * math.sqrt(4))  # pre-activation std 2.4: a hard case
    exact = torch_ntk.analytic_ntk(x, depth=4, activation="tanh", w_std=1.2, quadrature_degree=640)
    errors = [_rel(torch_ntk.analytic_ntk(x, depth=4, activation="tanh", w_std=1.2,
                                          quadrature_degree=n), exact) for n in (32, 96, 256)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-5


def test_named_activations_are_the_module_functions():
    x = _sphere(5, 3)
    for name, fn in [("gelu", torch.nn.functional.gelu), ("sigmoid", torch.sigmoid),
                     ("softplus", torch.nn.functional.softplus), ("tanh", torch.tanh)]:
        torch.testing.assert_close(torch_ntk.analytic_ntk(x, depth=3, activation=name),
                                   torch_ntk.analytic_ntk(x, depth=3, activation=fn),
                                   rtol=1e-14, atol=0)


# Kernel properties

@pytest.mark.parametrize("act", ["relu", "erf", "tanh"])
def test_symmetric_psd_and_tiling(act):
    x = torch.randn(33, 4, dtype=F64)
    k = torch_ntk.analytic_ntk(x, depth=3, activation=act, b_std=0.1)
    assert torch.equal(k, k.T)
    eig = torch.linalg.eigvalsh(k)
    assert eig.min() > -1e-12 * eig.max()
    for batch_size in (1, 7, 32) if act != "tanh" else (7, 32):
        torch.testing.assert_close(torch_ntk.analytic_ntk(x, depth=3, activation=act, b_std=0.1,
                                                          batch_size=batch_size),
                                   k, rtol=1e-13, atol=1e-13)
    # The general x2 path (no symmetry used) agrees, duplicated inputs included (their ρ is
    # 1 up to rounding, which relu's Σ̇ = (π - acos ρ)/(2π) would amplify to O(sqrt(eps))).
    k12 = torch_ntk.analytic_ntk(x, x[:10].clone(), depth=3, activation=act, b_std=0.1,
                                 batch_size=8)
    torch.testing.assert_close(k12, k[:, :10], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("act", ["relu", "erf", "tanh", "gelu", torch.nn.functional.silu])
def test_positive_definite_on_the_sphere(act):
    x = _sphere(24, 3)
    k = torch_ntk.analytic_ntk(x, depth=3, activation=act)
    eig = torch.linalg.eigvalsh(k)
    # Odd activations without bias give small but clearly positive eigenvalues (~1e-6 here).
    assert eig.min() > 1e-9 * eig.max()
    # A polynomial activation is not enough: the identity network's kernel has rank n0 = 3.
    lin = torch.linalg.eigvalsh(torch_ntk.analytic_ntk(x, depth=3, activation="identity"))
    assert lin[-4] < 1e-12 * lin[-1]


@pytest.mark.parametrize("act", ["relu", "erf", "identity", "tanh", lambda v: torch.relu(v)])
@pytest.mark.parametrize("b_std", [0.0, 0.5])
def test_zero_and_near_parallel_inputs_are_finite(act, b_std):
    x = _sphere(5, 4)
    x[1] = 0.0
    x[2] = x[0] * (1 + 1e-12)
    x[3] = -x[0]
    x[4] = x[0] + 1e-9
    k = torch_ntk.analytic_ntk(x, x.clone(), depth=4, activation=act, b_std=b_std,
                               get=("nngp", "ntk"))
    ks = torch_ntk.analytic_ntk(x, depth=4, activation=act, b_std=b_std, get=("nngp", "ntk"))
    for kern in (*k, *ks):
        assert torch.isfinite(kern).all()
        # Nearly identical inputs give nearly the diagonal value.
        assert kern[0, 2].item() == pytest.approx(kern[0, 0].item(), rel=1e-6)
        assert kern[0, 4].item() == pytest.approx(kern[0, 0].item(), rel=1e-6)
    if b_std == 0.0 and act in ("relu", "erf", "identity", "tanh"):
        # A zero input gives zero pre-activations everywhere: no kernel at all.
        assert torch.all(ks.ntk[1] == 0) and torch.all(ks.nngp[1] == 0)


def test_get_variants():
    x = torch.randn(4, 3, dtype=F64)
    both = torch_ntk.analytic_ntk(x, depth=3, get=("ntk", "nngp"))
    assert both._fields == ("ntk", "nngp")
    torch.testing.assert_close(both.ntk, torch_ntk.analytic_ntk(x, depth=3))
    torch.testing.assert_close(both.nngp, torch_ntk.analytic_ntk(x, depth=3, get="nngp"))
    assert torch_ntk.analytic_ntk(x, depth=3, get=["nngp"])._fields == ("nngp",)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_float32_and_device(device, act):
    x = torch.randn(20, 6, dtype=F64)
    ref = torch_ntk.analytic_ntk(x, depth=4, activation=act, b_std=0.2)
    k = torch_ntk.analytic_ntk(x.float().to(device), depth=4, activation=act, b_std=0.2)
    assert k.dtype == torch.float32 and k.device.type == device
    assert _rel(k.cpu().double(), ref) < 1e-5
    k16 = torch_ntk.analytic_ntk(x.to(device, torch.bfloat16), depth=2, activation=act)
    assert k16.dtype == torch.bfloat16 and torch.isfinite(k16.float()).all()


# Wide NTKMLPs converge to the limit

def _mean_empirical(x, width, seeds, **kw):
    kernels = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = torch_ntk.NTKMLP(x.shape[1], width, out_features=2, dtype=F64, **kw)
        kernels.append(torch_ntk.empirical_ntk(model, x, mode="trace") / 2)
    return torch.stack(kernels)


@pytest.mark.parametrize("act,b_std", [("relu", 0.0), ("tanh", 0.2)])
def test_wide_ntkmlp_converges_to_the_limit(act, b_std):
    x = torch.randn(6, 4, dtype=F64)
    kw = dict(depth=3, activation=act, w_std=1.2, b_std=b_std)
    limit = torch_ntk.analytic_ntk(x, **kw)
    errors = {}
    for width, seeds in ((64, range(4)), (2048, range(4))):
        kernels = _mean_empirical(x, width, seeds, **kw)
        per_seed = [float((k - limit).norm() / limit.norm()) for k in kernels]
        errors[width] = float(np.mean(per_seed))
        if width == 2048:
            assert max(per_seed) < 0.15
            mean = kernels.mean(0)
            assert float((mean - limit).norm() / limit.norm()) < 0.06
    # Error ~ width^-1/2: a factor sqrt(32) ≈ 5.7 expected; ask for 2.5.
    assert errors[2048] < errors[64] / 2.5, errors


def test_nngp_of_both_parameterizations():
    # Many outputs of one wide network: their covariance over outputs is the NNGP.
    x = _sphere(5, 4)
    limit = torch_ntk.analytic_ntk(x, depth=3, activation="erf", b_std=0.3, get="nngp")
    for parameterization in ("ntk", "standard"):
        torch.manual_seed(1)
        model = torch_ntk.NTKMLP(4, 2048, 3, 4000, activation="erf", b_std=0.3, dtype=F64,
                                 parameterization=parameterization)
        with torch.no_grad():
            f = model(x)
        cov = f @ f.T / f.shape[1]
        assert float((cov - limit).norm() / limit.norm()) < 0.06, parameterization


# NTKMLP

def test_ntkmlp_structure_and_seed():
    torch.manual_seed(3)
    a = torch_ntk.NTKMLP(3, 16, 3, 2, activation="tanh", w_std=1.5, b_std=0.2)
    torch.manual_seed(3)
    b = torch_ntk.NTKMLP(3, 16, 3, 2, activation="tanh", w_std=1.5, b_std=0.2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert [type(m) for m in a.layers] == [torch_ntk.NTKLinear] * 3
    assert [(m.in_features, m.out_features) for m in a.layers] == [(3, 16), (16, 16), (16, 2)]
    assert a.layers[1].weight_scale == pytest.approx(1.5 / 4)
    assert a.layers[1].bias_scale == pytest.approx(0.2)
    x = torch.randn(7, 3)
    h = x
    for i, layer in enumerate(a.layers):
        h = layer(torch.tanh(h) if i else h)
    torch.testing.assert_close(a(x), h)
    one = torch_ntk.NTKMLP(3, 16, 1)
    assert len(one.layers) == 1 and one.layers[0].bias is None
    std = torch_ntk.NTKMLP(3, 16, 2, parameterization="standard", dtype=F64)
    assert isinstance(std.layers[0], torch.nn.Linear) and std.layers[0].weight.dtype == F64
    assert torch.all(std.layers[0].bias == 0) and std.layers[0].bias.requires_grad


# Errors

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(depth=0), ValueError, "depth must be an int ≥ 1"),
    (dict(depth=2.0), TypeError, "depth must be an int"),
    (dict(depth=2, activation="Relu"), ValueError, "unknown activation 'Relu'"),
    (dict(depth=2, activation=3), TypeError, "activation must be"),
    (dict(depth=2, get="kernel"), ValueError, "get must be one of"),
    (dict(depth=2, get=("ntk", "ntk")), ValueError, "distinct"),
    (dict(depth=2, get=()), ValueError, "get must be"),
    (dict(depth=2, w_std=-1.0), ValueError, "w_std must be a finite float"),
    (dict(depth=2, b_std=float("nan")), ValueError, "b_std"),
    (dict(depth=2, quadrature_degree=1), ValueError, "quadrature_degree"),
    (dict(depth=2, batch_size=0), ValueError, "batch_size"),
    (dict(depth=2, activation=lambda v: v.sum(-1)), TypeError, "elementwise"),
    (dict(depth=2, activation=lambda v: torch.softmax(v, -1)), ValueError, "mixes entries"),
    (dict(depth=2, activation=lambda v: torch.cumsum(v, -1)), ValueError, "mixes entries"),
    (dict(depth=2, activation=lambda v: torch.exp(v ** 3)), ValueError, "not finite"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        torch_ntk.analytic_ntk(torch.randn(3, 2, dtype=F64), **kwargs)


def test_bad_inputs():
    x = torch.randn(3, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"same number of features.*\(3, 2\).*\(3, 5\)"):
        torch_ntk.analytic_ntk(x, torch.randn(3, 5, dtype=F64), depth=2)
    with pytest.raises(ValueError, match="x2 contains NaN"):
        torch_ntk.analytic_ntk(x, torch.full((2, 2), float("nan"), dtype=F64), depth=2)
    with pytest.raises(ValueError, match="x1 contains NaN or infinite"):
        torch_ntk.analytic_ntk(torch.tensor([[1.0, float("inf")]]), depth=2)
    with pytest.raises(ValueError, match="shape \\(N, n0\\)"):
        torch_ntk.analytic_ntk(torch.randn(3, 2, 2), depth=2)
    with pytest.raises(TypeError, match="floating-point"):
        torch_ntk.analytic_ntk(torch.ones(3, 2, dtype=torch.int64), depth=2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        torch_ntk.analytic_ntk(np.ones((3, 2)), depth=2)
    with pytest.raises(ValueError, match="float64 but x2 is torch.float32"):
        torch_ntk.analytic_ntk(x, x.float(), depth=2)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(width=0), ValueError, "width must be an int ≥ 1"),
    (dict(width=8.0), TypeError, "width must be an int"),
    (dict(depth=0), ValueError, "depth"),
    (dict(activation="swish"), ValueError, "unknown activation 'swish'"),
    (dict(parameterization="mup"), ValueError, "parameterization must be one of"),
    (dict(w_std=-2.0), ValueError, "w_std"),
])
def test_ntkmlp_bad_arguments(kwargs, exc, match):
    args = dict(in_features=3, width=8, depth=2) | kwargs
    with pytest.raises(exc, match=match):
        torch_ntk.NTKMLP(**args)
