"""torch_ntk.predict.gradient_descent_mse against explicit integration of the gradient-flow ODE."""
from __future__ import annotations

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
