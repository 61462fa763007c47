"""torch_ntk.predict.gradient_descent_mse against explicit integration of the gradient-flow ODE."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import torch_ntk
from torch_ntk.predict import gradient_descent_mse

F64 = torch.float64


def _kernels(n: int, m: int, kk: int, coupled: bool, dtype=F64):
    """Random PSD joint kernel of n train and m test points: (k_train_train, k_test_train)."""
    d = (n + m) * kk
    a = torch.randn(d, d + 3, dtype=dtype)
    joint = a @ a.T / d + 0.05 * torch.eye(d, dtype=dtype)
    if coupled:  # (n+m)K x (n+m)K in (n, a) order -> k[n, m, a, b]
        joint = joint.reshape(n + m, kk, n + m, kk).permute(0, 2, 1, 3)
        return joint[:n, :n].contiguous(), joint[n:, :n].contiguous()
    joint = joint[:n + m, :n + m]
    return joint[:n, :n].contiguous(), joint[n:, :n].contiguous()


def _flat(k: torch.Tensor) -> torch.Tensor:
    if k.ndim == 2:
        return k
    return k.permute(0, 2, 1, 3).reshape(k.shape[0] * k.shape[2], k.shape[1] * k.shape[3])


def _euler(k_tt, k_st, y, f0, ft0, lr, t_end, diag_reg, steps):
    """Explicit Euler for df/dt = -lr/n · K_reg (f - y), df_test/dt = -lr/n · K_st (f - y)."""
    n_out = y.numel()
    coupled = k_tt.ndim == 4
    y2 = y.reshape(y.shape[0], -1)
    kk = y2.shape[1]
    k2, ks2 = _flat(k_tt), _flat(k_st)
    k2 = k2 + diag_reg * torch.diagonal(k2).mean() * torch.eye(k2.shape[0], dtype=k2.dtype)
    if coupled:
        f, g, yv = f0.reshape(-1, 1), ft0.reshape(-1, 1), y2.reshape(-1, 1)
    else:
        f, g, yv = f0.reshape(-1, kk), ft0.reshape(-1, kk), y2
    dt = lr * t_end / steps
    for _ in range(steps):
        r = f - yv
        f, g = f - dt / n_out * (k2 @ r), g - dt / n_out * (ks2 @ r)
    return f.reshape(y.shape), g.reshape((ft0.shape[0],) + tuple(y.shape[1:]))


def _euler_extrapolated(*args, steps):
    """Richardson extrapolation of Euler: O(dt²) accurate."""
    f1, g1 = _euler(*args, steps=steps)
    f2, g2 = _euler(*args, steps=2 * steps)
    return 2 * f2 - f1, 2 * g2 - g1


@pytest.mark.parametrize("coupled", [False, True], ids=["NxN", "NxNxKxK"])
@pytest.mark.parametrize("y_1d", [False, True], ids=["y2d", "y1d"])
@pytest.mark.parametrize("diag_reg", [0.0, 0.1])
def test_matches_euler_integration(coupled, y_1d, diag_reg):
    n, m, kk, lr = 6, 4, (1 if y_1d else 3), 0.5
    k_tt, k_st = _kernels(n, m, kk, coupled)
    y = torch.randn(n, dtype=F64) if y_1d else torch.randn(n, kk, dtype=F64)
    f0, ft0 = torch.randn_like(y), torch.randn((m,) + tuple(y.shape[1:]), dtype=F64)
    predict_fn = gradient_descent_mse(k_tt, y, learning_rate=lr, diag_reg=diag_reg)
    times = torch.tensor([0.0, 3.0, 20.0], dtype=F64)
    f_t, g_t = predict_fn(times, f0, ft0, k_st)
    assert f_t.shape == (3,) + tuple(y.shape) and g_t.shape == (3,) + tuple(ft0.shape)
    for i, t in enumerate(times.tolist()):
        f_ref, g_ref = _euler_extrapolated(k_tt, k_st, y, f0, ft0, lr, t, diag_reg,
                                           steps=max(1, int(100 * t)))
        torch.testing.assert_close(f_t[i], f_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_t[i], g_ref, rtol=1e-5, atol=1e-5)
        f_s = predict_fn(t, f0)  # scalar t, train only: no leading time axis
        torch.testing.assert_close(f_s, f_t[i], rtol=1e-12, atol=1e-12)


def test_t_zero_returns_initial_outputs():
    k_tt, k_st = _kernels(5, 3, 2, coupled=True)
    y, f0, ft0 = torch.randn(5, 2, dtype=F64), torch.randn(5, 2, dtype=F64), torch.randn(3, 2,
                                                                                       dtype=F64)
    f, g = gradient_descent_mse(k_tt, y)(0.0, f0, ft0, k_st)
    torch.testing.assert_close(f, f0, rtol=0, atol=1e-14)
    torch.testing.assert_close(g, ft0, rtol=0, atol=1e-14)


@pytest.mark.parametrize("coupled", [False, True], ids=["NxN", "NxNxKxK"])
def test_t_none_is_kernel_regression(coupled):
    n, m, kk = 7, 5, 2
    k_tt, k_st = _kernels(n, m, kk, coupled)
    y, f0 = torch.randn(n, kk, dtype=F64), torch.randn(n, kk, dtype=F64)
    ft0 = torch.randn(m, kk, dtype=F64)
    predict_fn = gradient_descent_mse(k_tt, y, diag_reg=0.01)
    f_inf, g_inf = predict_fn(None, f0, ft0, k_st)
    k2 = _flat(k_tt)
    k2 = k2 + 0.01 * torch.diagonal(k2).mean() * torch.eye(k2.shape[0], dtype=F64)
    if coupled:
        alpha = torch.linalg.solve(k2, (y - f0).reshape(-1)).reshape(n, kk)
        g_ref = ft0 + torch.einsum("mnab,nb->ma", k_st, alpha)
    else:
        g_ref = ft0 + k_st @ torch.linalg.solve(k2, y - f0)
    torch.testing.assert_close(f_inf, y, rtol=0, atol=0)
    torch.testing.assert_close(g_inf, g_ref, rtol=1e-10, atol=1e-10)
    f_late, g_late = predict_fn(1e7, f0, ft0, k_st)  # long training converges to it
    torch.testing.assert_close(f_late, y, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(g_late, g_ref, rtol=1e-8, atol=1e-8)
    assert predict_fn(None, None, ft0, k_st).shape == (m, kk)  # fx_train_0=None: test only


def test_float32_and_eigendecomposition_cached(monkeypatch):
    k_tt, k_st = _kernels(6, 2, 1, coupled=False, dtype=torch.float32)
    y = torch.randn(6, dtype=torch.float32)
    calls = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: calls.append(1) or eigh(a))
    predict_fn = gradient_descent_mse(k_tt, y)
    assert not calls  # lazily
    for t in (1.0, torch.tensor([2.0, 3.0])):
        f, g = predict_fn(t, 0.0, 0.0, k_st)
        assert f.dtype == g.dtype == torch.float32
    assert len(calls) == 1
    assert g.shape == (2, 2)


def test_linearized_network_gradient_descent():
    """Small-step full-batch GD of a linearized net follows the predictor with its empirical NTK."""
    net = nn.Sequential(nn.Linear(2, 12), nn.Tanh(), nn.Linear(12, 2)).to(F64)
    x, x_test = torch.randn(5, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    y = torch.randn(5, 2, dtype=F64)
    k_tt = torch_ntk.empirical_ntk(net, x, mode="full")
    k_st = torch_ntk.empirical_ntk(net, x_test, x, mode="full")
    lr, t_end = 0.5, 40.0

    def train(steps):
        lin = torch_ntk.linearize(net)
        opt = torch.optim.SGD(lin.parameters(), lr=lr * t_end / steps)
        for _ in range(steps):
            opt.zero_grad()
            loss = ((lin(x) - y) ** 2).sum() / (2 * y.numel())
            loss.backward()
            opt.step()
        with torch.no_grad():
            return lin(x), lin(x_test)

    (f1, g1), (f2, g2) = train(200), train(400)
    with torch.no_grad():
        f, g = gradient_descent_mse(k_tt, y, learning_rate=lr)(t_end, net(x), net(x_test), k_st)
    torch.testing.assert_close(2 * f2 - f1, f, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(2 * g2 - g1, g, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("case, exc, match", [
    ("k_not_tensor", TypeError, "k_train_train must be a torch.Tensor"),
    ("k_int", ValueError, "float32 or float64"),
    ("k_wrong_n", ValueError, r"needs N = y_train.shape\[0\] = 4"),
    ("k_wrong_k", ValueError, r"needs \(4, 4, 2, 2\)"),
    ("k_3d", ValueError, r"shape \(N, N\) or \(N, N, K, K\)"),
    ("k_asym", ValueError, "must be symmetric"),
    ("k_nan", ValueError, "NaN or infinite"),
    ("neg_reg", ValueError, "diag_reg must be a float >= 0"),
])
def test_constructor_errors(case, exc, match):
    k, _ = _kernels(4, 1, 1, coupled=False)
    y = torch.randn(4, 2, dtype=F64)
    kwargs = {}
    if case == "k_not_tensor":
        k = k.tolist()
    elif case == "k_int":
        k = k.long()
    elif case == "k_wrong_n":
        k = k[:3, :3]
    elif case == "k_wrong_k":
        k = torch.ones(4, 4, 3, 3, dtype=F64)
    elif case == "k_3d":
        k = torch.ones(4, 4, 2, dtype=F64)
    elif case == "k_asym":
        k = k.clone()
        k[0, 1] += 1.0
    elif case == "k_nan":
        k = k.clone()
        k[2, 2] = float("nan")
    elif case == "neg_reg":
        kwargs["diag_reg"] = -1.0
    with pytest.raises(exc, match=match):
        gradient_descent_mse(k, y, **kwargs)


@pytest.mark.parametrize("case, exc, match", [
    ("nothing", ValueError, "both None"),
    ("no_k_test", ValueError, "need k_test_train"),
    ("k_test_shape", ValueError, r"k_test_train must have shape \(M, N\)"),
    ("k_test_full", ValueError, r"k_test_train must have shape \(M, N\)"),
    ("f0_shape", ValueError, "fx_train_0 of shape"),
    ("ft0_shape", ValueError, "fx_test_0 of shape"),
    ("negative_t", ValueError, "finite and >= 0"),
    ("t_string", TypeError, "t must be None"),
    ("singular", ValueError, "not positive definite"),
])
def test_predict_fn_errors(case, exc, match):
    k, k_st = _kernels(4, 3, 1, coupled=False)
    y = torch.randn(4, 2, dtype=F64)
    args = dict(t=1.0, fx_train_0=0.0, fx_test_0=None, k_test_train=None)
    if case == "nothing":
        args["fx_train_0"] = None
    elif case == "no_k_test":
        args["fx_test_0"] = 0.0
    elif case == "k_test_shape":
        args.update(fx_test_0=0.0, k_test_train=k_st[:, :3])
    elif case == "k_test_full":
        args.update(fx_test_0=0.0, k_test_train=torch.ones(3, 4, 2, 2, dtype=F64))
    elif case == "f0_shape":
        args["fx_train_0"] = torch.zeros(4, 3, dtype=F64)
    elif case == "ft0_shape":
        args.update(fx_test_0=torch.zeros(2, 2, dtype=F64), k_test_train=k_st)
    elif case == "negative_t":
        args["t"] = torch.tensor([1.0, -1.0])
    elif case == "t_string":
        args["t"] = "1"
    elif case == "singular":
        k = torch.ones(4, 4, dtype=F64)
        args.update(t=None, fx_test_0=0.0, k_test_train=k_st)
    predict_fn = gradient_descent_mse(k, y)
    with pytest.raises(exc, match=match):
        predict_fn(**args)


# gradient_descent (any loss, numerical ODE), gp_inference, gradient_descent_mse_ensemble

from torch_ntk.predict import (Gaussian, gp_inference, gradient_descent,  # noqa: E402
                               gradient_descent_mse_ensemble)


def _mse(fx, y):
    return 0.5 * ((fx - y) ** 2).sum() / y.numel()


def _cross_entropy(fx, y):
    return -(y * torch.log_softmax(fx, dim=-1)).sum() / y.shape[0]


@pytest.mark.parametrize("coupled", [False, True], ids=["NxN", "NxNxKxK"])
def test_gradient_descent_mse_loss_matches_closed_form(coupled):
    torch.manual_seed(1)
    k_tt, k_st = _kernels(6, 3, 2, coupled)
    y = torch.randn(6, 2, dtype=F64)
    f0, g0 = 0.3 * torch.randn(6, 2, dtype=F64), 0.3 * torch.randn(3, 2, dtype=F64)
    t = torch.tensor([[4.0, 0.0], [1.5, 4.0]])  # any order, repeats, a 2-D shape
    got = gradient_descent(_mse, k_tt, y, learning_rate=0.7)(t, f0, g0, k_st)
    want = gradient_descent_mse(k_tt, y, learning_rate=0.7)(t, f0, g0, k_st)
    assert got[0].shape == (2, 2, 6, 2) and got[1].shape == (2, 2, 3, 2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-8)
    # Only test outputs, and a 1-D target.
    y1 = y[:, 0]
    k1, ks1 = (_kernels(6, 3, 1, False) if coupled else (k_tt, k_st))
    got = gradient_descent(_mse, k1, y1)(2.0, None, 0.0, ks1)
    want = gradient_descent_mse(k1, y1)(2.0, None, 0.0, ks1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-8)


def test_gradient_descent_t_none_is_kernel_regression_for_mse():
    torch.manual_seed(2)
    k_tt, k_st = _kernels(5, 2, 1, False)
    k_tt = k_tt + 0.5 * torch.eye(5, dtype=F64)  # well conditioned: converges in a few steps
    y = torch.randn(5, 1, dtype=F64)
    f, g = gradient_descent(_mse, k_tt, y, learning_rate=2.0)(None, 0.1, 0.0, k_st)
    f_ref, g_ref = gradient_descent_mse(k_tt, y)(None, 0.1, 0.0, k_st)
    torch.testing.assert_close(f, f_ref, rtol=0, atol=1e-7)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-7)


def test_gradient_descent_cross_entropy_matches_solve_ivp():
    """Softmax cross-entropy: compare with scipy's DOP853 on the explicit right-hand side."""
    integrate = pytest.importorskip("scipy.integrate")
    torch.manual_seed(3)
    n, m, kk, lr = 6, 3, 3, 0.8
    k_tt, k_st = _kernels(n, m, kk, False)
    y = torch.nn.functional.one_hot(torch.arange(n) % kk, kk).to(F64)
    f0, g0 = 0.5 * torch.randn(n, kk, dtype=F64), 0.5 * torch.randn(m, kk, dtype=F64)
    kn, ksn, yn = k_tt.numpy(), k_st.numpy(), y.numpy()

    def rhs(_, state):
        f = state[:n * kk].reshape(n, kk)
        p = np.exp(f - f.max(-1, keepdims=True))
        grad = (p / p.sum(-1, keepdims=True) - yn) / n  # ∇_f of the mean cross-entropy
        return -np.concatenate([(kn @ grad).ravel(), (ksn @ grad).ravel()])

    times = np.array([0.5, 3.0, 10.0])
    sol = integrate.solve_ivp(rhs, (0.0, lr * times[-1]),
                              np.concatenate([f0.numpy().ravel(), g0.numpy().ravel()]),
                              method="DOP853", t_eval=lr * times, rtol=1e-12, atol=1e-14)
    want_f = torch.from_numpy(sol.y[:n * kk].T.reshape(3, n, kk).copy())
    want_g = torch.from_numpy(sol.y[n * kk:].T.reshape(3, m, kk).copy())
    f, g = gradient_descent(_cross_entropy, k_tt, y, learning_rate=lr)(
        torch.from_numpy(times), f0, g0, k_st)
    torch.testing.assert_close(f, want_f, rtol=0, atol=1e-8)
    torch.testing.assert_close(g, want_g, rtol=0, atol=1e-8)
    assert float(_cross_entropy(f[-1], y)) < float(_cross_entropy(f0, y))


def test_gradient_descent_t_none_without_minimum_raises():
    k_tt, _ = _kernels(4, 1, 2, False)
    y = torch.nn.functional.one_hot(torch.arange(4) % 2, 2).to(F64)
    predict_fn = gradient_descent(_cross_entropy, k_tt, y, max_steps=40)
    with pytest.raises(ValueError, match="without converging"):
        predict_fn(None)


@pytest.mark.parametrize("case, exc, match", [
    ("loss_not_callable", TypeError, "loss must be a callable"),
    ("lr_negative", ValueError, "learning_rate must be finite and > 0"),
    ("lr_nan", ValueError, "learning_rate must be finite and > 0"),
    ("lr_string", TypeError, "learning_rate must be a number"),
    ("rtol_zero", ValueError, "rtol must be finite and > 0"),
    ("y_nan", ValueError, "y_train contains NaN"),
    ("k_shape", ValueError, r"needs N = y_train.shape\[0\] = 4"),
    ("max_steps", ValueError, "max_steps must be an integer"),
])
def test_gradient_descent_errors(case, exc, match):
    k, _ = _kernels(4, 1, 1, False)
    y = torch.randn(4, 2, dtype=F64)
    args, kwargs = [_mse, k, y], {}
    if case == "loss_not_callable":
        args[0] = "mse"
    elif case.startswith("lr_"):
        kwargs["learning_rate"] = {"lr_negative": -1.0, "lr_nan": float("nan"),
                                   "lr_string": "1"}[case]
    elif case == "rtol_zero":
        kwargs["rtol"] = 0.0
    elif case == "y_nan":
        y[1, 1] = float("nan")
        args[2] = y
    elif case == "k_shape":
        args[1] = k[:3, :3]
    elif case == "max_steps":
        kwargs["max_steps"] = 0
    with pytest.raises(exc, match=match):
        gradient_descent(*args, **kwargs)


def test_gradient_descent_predict_errors():
    k, k_st = _kernels(4, 3, 1, False)
    y = torch.randn(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="must return a scalar tensor"):
        gradient_descent(lambda f, y: (f - y) ** 2, k, y)(1.0)
    with pytest.raises(ValueError, match="finite and >= 0"):
        gradient_descent(_mse, k, y)(-1.0)
    with pytest.raises(ValueError, match="need k_test_train"):
        gradient_descent(_mse, k, y)(1.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"k_test_train must have shape \(M, N\)"):
        gradient_descent(_mse, k, y)(1.0, 0.0, 0.0, k_st[:, :2])
    with pytest.raises(ValueError, match="gradient of loss"):
        gradient_descent(lambda f, y: torch.log(f - f).sum(), k, y)(1.0)


def test_gradient_descent_names_the_extra_without_torchdiffeq(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)
    k, _ = _kernels(4, 1, 1, False)
    with pytest.raises(ImportError, match=r"pip install 'torch_ntk\[ode\]'"):
        gradient_descent(_mse, k, torch.randn(4, 1, dtype=F64))


@pytest.mark.parametrize("case, exc, match", [
    ("lr_negative", ValueError, "learning_rate must be finite and > 0"),
    ("lr_nan", ValueError, "learning_rate must be finite and > 0"),
    ("lr_string", TypeError, "learning_rate must be a number"),
    ("reg_nan", ValueError, "diag_reg must be a float >= 0"),
])
def test_gradient_descent_mse_rejects_bad_rates(case, exc, match):
    k, _ = _kernels(4, 1, 1, False)
    kwargs = {"lr_negative": dict(learning_rate=-1), "lr_nan": dict(learning_rate=float("nan")),
              "lr_string": dict(learning_rate="1"), "reg_nan": dict(diag_reg=float("nan"))}[case]
    with pytest.raises(exc, match=match):
        gradient_descent_mse(k, torch.randn(4, 1, dtype=F64), **kwargs)


def _joint_nngp_ntk(n: int, m: int, seed: int):
    """NNGP and NTK of a depth-3 ReLU network on n train and m test inputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n + m, 3, generator=gen, dtype=F64)
    k = torch_ntk.analytic_ntk(x, depth=3, b_std=0.1, get=("nngp", "ntk"))
    return x, k.nngp, k.ntk


def test_gp_inference_matches_explicit_formulas():
    n, m = 8, 4
    x, nngp, ntk = _joint_nngp_ntk(n, m, 4)
    y = torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    kern = lambda k, a, b: k[a, b]  # noqa: E731
    tr, te = slice(0, n), slice(n, n + m)
    train = {"nngp": nngp[tr, tr], "ntk": ntk[tr, tr]}
    test = {"nngp": nngp[te, tr], "ntk": ntk[te, tr]}
    reg = 1e-3
    out = gp_inference(train, y, diag_reg=reg)(None, test, nngp[te, te])
    assert out._fields == ("nngp", "ntk")
    eye = torch.eye(n, dtype=F64)
    inv = lambda k: torch.linalg.inv(k + reg * k.diagonal().mean() * eye)  # noqa: E731
    k_inv, t_inv = inv(kern(nngp, tr, tr)), inv(kern(ntk, tr, tr))
    torch.testing.assert_close(out.nngp.mean, nngp[te, tr] @ k_inv @ y, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.nngp.covariance,
                               nngp[te, te] - nngp[te, tr] @ k_inv @ nngp[tr, te],
                               rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.ntk.mean, ntk[te, tr] @ t_inv @ y, rtol=1e-9, atol=1e-10)
    a = ntk[te, tr] @ t_inv
    cov = (nngp[te, te] + a @ nngp[tr, tr] @ a.T - a @ nngp[tr, te] - nngp[te, tr] @ a.T)
    torch.testing.assert_close(out.ntk.covariance, cov, rtol=1e-8, atol=1e-10)
    # One kernel by name: a Gaussian; no k_test_test: no covariance.
    one = gp_inference(train, y, diag_reg=reg)("ntk", test)
    assert isinstance(one, Gaussian) and one.covariance is None
    torch.testing.assert_close(one.mean, out.ntk.mean, rtol=0, atol=0)
    # The NTK mean is kernel regression, i.e. gradient_descent_mse at t = ∞.
    f_inf = gradient_descent_mse(ntk[tr, tr], y, diag_reg=reg)(None, None, 0.0, ntk[te, tr])
    torch.testing.assert_close(one.mean, f_inf, rtol=1e-9, atol=1e-10)
    # Training inputs: N(y, 0); a single tensor: its own GP.
    on_train = gp_inference(train, y)(("nngp",), None, True)
    torch.testing.assert_close(on_train.nngp.mean, y)
    assert float(on_train.nngp.covariance.abs().max()) == 0.0
    single = gp_inference(nngp[tr, tr], y, diag_reg=reg)(None, nngp[te, tr], nngp[te, te])
    torch.testing.assert_close(single.covariance, out.nngp.covariance, rtol=0, atol=1e-12)


def test_gp_inference_coupled_kernels_match_block_diagonal():
    """An (N, N, K, K) kernel Θ ⊗ I gives the (N, N) results on every output."""
    n, m, kk = 6, 3, 2
    _, nngp, ntk = _joint_nngp_ntk(n, m, 6)
    eye = torch.eye(kk, dtype=F64)
    full = lambda k: k[..., None, None] * eye  # noqa: E731
    y = torch.randn(n, kk, dtype=F64)
    tr, te = slice(0, n), slice(n, n + m)
    flat = gp_inference({"nngp": nngp[tr, tr], "ntk": ntk[tr, tr]}, y, 1e-4)(
        None, {"nngp": nngp[te, tr], "ntk": ntk[te, tr]}, nngp[te, te])
    coupled = gp_inference({"nngp": full(nngp[tr, tr]), "ntk": full(ntk[tr, tr])}, y, 1e-4)(
        None, {"nngp": full(nngp[te, tr]), "ntk": full(ntk[te, tr])}, full(nngp[te, te]))
    for g in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(coupled, g).mean, getattr(flat, g).mean,
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(getattr(coupled, g).covariance,
                                   full(getattr(flat, g).covariance), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("case, exc, match", [
    ("bad_get", ValueError, "get must be 'nngp', 'ntk'"),
    ("get_type", TypeError, "get must be None"),
    ("ntk_cov_single", ValueError, "NTK covariance needs the NNGP"),
    ("missing", ValueError, "only hold"),
    ("k_test_shape", ValueError, r"k_test_train \(nngp\) must have shape"),
    ("k_test_test_shape", ValueError, r"k_test_test must have shape \(M, M\)"),
    ("reg_nan", ValueError, "diag_reg must be a float >= 0"),
    ("train_type", TypeError, "k_train_train must be a torch.Tensor or a namedtuple"),
    ("singular", ValueError, "not positive definite"),
])
def test_gp_inference_errors(case, exc, match):
    n, m = 5, 2
    _, nngp, ntk = _joint_nngp_ntk(n, m, 7)
    tr, te = slice(0, n), slice(n, n + m)
    y = torch.randn(n, 1, dtype=F64)
    train, reg = {"nngp": nngp[tr, tr], "ntk": ntk[tr, tr]}, 1e-6
    args = (None, {"nngp": nngp[te, tr], "ntk": ntk[te, tr]}, nngp[te, te])
    if case == "bad_get":
        args = ("gp",) + args[1:]
    elif case == "get_type":
        args = (3,) + args[1:]
    elif case == "ntk_cov_single":
        train, args = ntk[tr, tr], ("ntk", ntk[te, tr], nngp[te, te])
    elif case == "missing":
        train = {"ntk": ntk[tr, tr]}
        args = ("nngp",) + args[1:]
    elif case == "k_test_shape":
        args = (args[0], {"nngp": nngp[te, :n - 1], "ntk": ntk[te, tr]}, args[2])
    elif case == "k_test_test_shape":
        args = args[:2] + (nngp[te, tr],)
    elif case == "reg_nan":
        reg = float("nan")
    elif case == "train_type":
        train = [nngp[tr, tr]]
    elif case == "singular":
        train, reg = {"nngp": torch.ones(n, n, dtype=F64), "ntk": ntk[tr, tr]}, 0.0
    with pytest.raises(exc, match=match):
        gp_inference(train, y, diag_reg=reg)(*args)


def _kernel_fn():
    """kernel_fn(x1, x2, get) of the network of _joint_nngp_ntk."""
    def kernel_fn(x1, x2, get):
        return torch_ntk.analytic_ntk(x1, x2, depth=3, b_std=0.1, get=get)
    return kernel_fn


def test_ensemble_mean_is_kernel_gd_and_t_inf_is_gp_inference():
    n, m = 8, 4
    x, nngp, ntk = _joint_nngp_ntk(n, m, 8)
    xtr, xte = x[:n], x[n:]
    y = torch.randn(n, 2, dtype=F64)
    fn = gradient_descent_mse_ensemble(_kernel_fn(), xtr, y, learning_rate=0.5)
    t = torch.tensor([0.0, 3.0, 40.0])
    mean = fn(t, xte, "ntk")
    want = gradient_descent_mse(ntk[:n, :n], y, learning_rate=0.5)(t, None, 0.0, ntk[n:, :n])
    torch.testing.assert_close(mean, want, rtol=1e-9, atol=1e-11)
    want_train = gradient_descent_mse(ntk[:n, :n], y, learning_rate=0.5)(t, 0.0)
    torch.testing.assert_close(fn(t, None, "ntk"), want_train, rtol=1e-9, atol=1e-11)
    both = fn(None, xte, None, compute_cov=True)
    ref = gp_inference({"nngp": nngp[:n, :n], "ntk": ntk[:n, :n]}, y)(
        None, {"nngp": nngp[n:, :n], "ntk": ntk[n:, :n]}, nngp[n:, n:])
    for g in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(both, g).mean, getattr(ref, g).mean)
        torch.testing.assert_close(getattr(both, g).covariance, getattr(ref, g).covariance)
    late = fn(1e12, xte, None, compute_cov=True)
    for g in ("nngp", "ntk"):
        torch.testing.assert_close(getattr(late, g).mean, getattr(ref, g).mean,
                                   rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(getattr(late, g).covariance, getattr(ref, g).covariance,
                                   rtol=1e-6, atol=1e-7)
    at0 = fn(0.0, xte, ("ntk",), compute_cov=True).ntk
    assert float(at0.mean.abs().max()) == 0.0
    torch.testing.assert_close(at0.covariance, nngp[n:, n:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("g", ["ntk", "nngp"])
@pytest.mark.parametrize("on_train", [False, True], ids=["test", "train"])
def test_ensemble_covariance_matches_monte_carlo_over_gp_samples(g, on_train):
    """f0 ~ GP(0, K) on train ∪ test, then kernel gradient descent: sample mean/covariance."""
    n, m, samples, lr, t = 6, 3, 40000, 0.5, 5.0
    x, nngp, ntk = _joint_nngp_ntk(n, m, 9)
    y = torch.randn(n, 1, dtype=F64, generator=torch.Generator().manual_seed(10))
    kern = ntk if g == "ntk" else nngp
    gen = torch.Generator().manual_seed(11)
    chol = torch.linalg.cholesky(nngp + 1e-12 * torch.eye(n + m, dtype=F64))
    f0 = (chol @ torch.randn(n + m, samples, generator=gen, dtype=F64)).T  # (S, n + m)
    # An (N, N) kernel acts on each output column alone: the S samples are S columns (the loss
    # is normalised by y.numel(), hence the learning rate times S).
    k_lin = gradient_descent_mse(kern[:n, :n], y.expand(n, samples), learning_rate=lr * samples)
    f_train, f_test = k_lin(t, f0[:, :n].T, f0[:, n:].T, kern[n:, :n])
    draws = (f_train if on_train else f_test).T  # (S, M)
    fn = gradient_descent_mse_ensemble(_kernel_fn(), x[:n], y, learning_rate=lr)
    out = fn(t, None if on_train else x[n:], g, compute_cov=True)
    mc_mean = draws.mean(0)
    centred = draws - mc_mean
    mc_cov = centred.T @ centred / (samples - 1)
    sd = out.covariance.diagonal().clamp_min(0).sqrt()
    # Standard errors of the sample mean and covariance (Gaussian draws), 5 sigma.
    tol_mean = 5 * sd / samples ** 0.5
    tol_cov = 5 * ((sd[:, None] * sd[None, :]) ** 2 + out.covariance ** 2).sqrt() / samples ** .5
    assert bool(((mc_mean - out.mean[:, 0]).abs() <= tol_mean + 1e-12).all())
    assert bool(((mc_cov - out.covariance).abs() <= tol_cov + 1e-12).all())
    assert float(out.covariance.diagonal().max()) > 1e-4  # not a trivially zero covariance


@pytest.mark.parametrize("case, exc, match", [
    ("kernel_fn", TypeError, "kernel_fn must be callable"),
    ("lr", ValueError, "learning_rate must be finite and > 0"),
    ("reg", ValueError, "diag_reg must be a float >= 0"),
    ("rows", ValueError, "same number N of rows"),
    ("t", ValueError, "finite and >= 0"),
    ("get", ValueError, "get must be 'nngp', 'ntk'"),
    ("x_test", TypeError, "x_test must be a torch.Tensor"),
])
def test_ensemble_errors(case, exc, match):
    x = torch.randn(5, 3, dtype=F64)
    y = torch.randn(5, 1, dtype=F64)
    kf, kwargs = _kernel_fn(), {}
    call = dict(t=1.0, x_test=None, get=None)
    if case == "kernel_fn":
        kf = "relu"
    elif case == "lr":
        kwargs["learning_rate"] = -1.0
    elif case == "reg":
        kwargs["diag_reg"] = float("nan")
    elif case == "rows":
        y = y[:4]
    elif case == "t":
        call["t"] = -2.0
    elif case == "get":
        call["get"] = "nt"
    elif case == "x_test":
        call["x_test"] = [[0.0, 1.0, 2.0]]
    with pytest.raises(exc, match=match):
        gradient_descent_mse_ensemble(kf, x, y, **kwargs)(**call)
