"""Argument validation and small kernel helpers shared by the functions of
``torch_ntk.dynamics.predict``: checks of training kernels and targets (``_check_train``),
of ``predict_fn``'s initial outputs, test kernels and times, of learning rates, ridges and
solver tolerances, and of the kernel containers and ``get`` names of the Gaussian-process
functions, plus the ridge (``_add_diagonal_regularizer``) and the test-kernel product
(``_apply_test_kernel``) used by both gradient-descent predictors.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Tuple, Union

import torch
from torch import Tensor

_Scalar = Union[int, float]
_GETS = ("nngp", "ntk")
PredictFn = Callable[..., Union[Tensor, Tuple[Tensor, Tensor]]]


def _check_train(k: Tensor, y: Tensor, diag_reg: float, name: str = "gradient_descent_mse",
                 k_label: str = "k_train_train") -> tuple[Tensor, tuple[int, ...], bool]:
    """Validates the training kernel and targets; returns the 2-D kernel, y's shape, coupling."""
    if not isinstance(k, Tensor):
        raise TypeError(f"{name}: {k_label} must be a torch.Tensor, got {type(k).__name__}.")
    if not isinstance(y, Tensor):
        raise TypeError(f"{name}: y_train must be a torch.Tensor, got {type(y).__name__}.")
    if k.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name}: {k_label} must be float32 or float64, got {k.dtype}. "
                         "Convert it with k.double() or k.float().")
    if y.ndim == 0:
        raise ValueError(f"{name}: y_train must have shape (N,) or (N, *out_shape), got a scalar.")
    if y.device != k.device:
        raise ValueError(f"{name}: y_train is on {y.device} but {k_label} is on {k.device}; "
                         "move both to the same device.")
    n = y.shape[0]
    kk = int(torch.Size(y.shape[1:]).numel())
    if k.ndim == 2:
        coupled = False
        if tuple(k.shape) != (n, n):
            raise ValueError(
                f"{name}: {k_label} of shape {tuple(k.shape)} does not fit y_train of shape "
                f"{tuple(y.shape)}; an (N, N) kernel needs N = y_train.shape[0] = {n}.")
        k_flat = k.detach()
    elif k.ndim == 4:
        coupled = True
        if tuple(k.shape) != (n, n, kk, kk):
            raise ValueError(
                f"{name}: {k_label} of shape {tuple(k.shape)} does not fit y_train of shape "
                f"{tuple(y.shape)}; an (N, N, K, K) kernel (layout k[n, m, a, b] of "
                f"empirical_ntk(mode='full')) needs ({n}, {n}, {kk}, {kk}) here. For an (N, N) "
                "kernel shared by every output, use mode='trace' and divide by K.")
        k_flat = k.detach().permute(0, 2, 1, 3).reshape(n * kk, n * kk)
    else:
        raise ValueError(
            f"{name}: {k_label} must have shape (N, N) or (N, N, K, K), got "
            f"{tuple(k.shape)}.")
    if not bool(torch.isfinite(k_flat).all()):
        raise ValueError(f"{name}: {k_label} contains NaN or infinite values.")
    scale = float(k_flat.abs().max()) if k_flat.numel() else 0.0
    asym = float((k_flat - k_flat.mT).abs().max()) if k_flat.numel() else 0.0
    # Loose enough for a float32 kernel cast to float64, tight enough to catch k_test_train.
    rtol = max(torch.finfo(k_flat.dtype).eps ** 0.5, 1e-5)
    tol = rtol * max(scale, torch.finfo(k_flat.dtype).tiny)
    if asym > tol:
        raise ValueError(
            f"{name}: {k_label} must be symmetric (Θ(x_n, x_m)_ab = Θ(x_m, x_n)_ba), but "
            f"max |k - kᵀ| = {asym:.3g} with max |k| = {scale:.3g}. Pass the kernel of the "
            "training inputs with themselves (x2=None), not a test-train kernel.")
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"{name}: y_train contains NaN or infinite values.")
    _check_diag_reg(diag_reg, name)
    return 0.5 * (k_flat + k_flat.mT), tuple(y.shape), coupled


def _add_diagonal_regularizer(k: Tensor, diag_reg: float, absolute: bool) -> Tensor:
    """Returns ``k + diag_reg · (1 if absolute else mean(diag(k))) · I``."""
    if diag_reg == 0.0:
        return k
    scale = diag_reg if absolute else diag_reg * float(torch.diagonal(k).mean())
    return k + scale * torch.eye(k.shape[0], dtype=k.dtype, device=k.device)


def _check_predict_inputs(fx_train_0, fx_test_0, k_test_train, y_shape: tuple[int, ...], n: int,
                          kk: int, coupled: bool, dtype: torch.dtype, device: torch.device):
    """Validates predict_fn's inputs; returns (f_train0 (N, K), f_test0 (M, K), k_test, M)."""
    name = "predict_fn"
    if fx_train_0 is None and fx_test_0 is None:
        raise ValueError(f"{name}: fx_train_0 and fx_test_0 are both None, so there is nothing "
                         "to predict. Pass the initial outputs (or 0.0) for at least one.")
    f_train0 = _as_outputs(0.0 if fx_train_0 is None else fx_train_0, "fx_train_0", y_shape,
                           dtype, device).reshape(n, kk)
    if fx_test_0 is None:
        return f_train0, None, None, 0
    if k_test_train is None:
        raise ValueError(f"{name}: predictions on test inputs (fx_test_0 given) need "
                         "k_test_train, the kernel between test and training inputs.")
    if not isinstance(k_test_train, Tensor):
        raise TypeError(f"{name}: k_test_train must be a torch.Tensor, got "
                        f"{type(k_test_train).__name__}.")
    if k_test_train.device != device:
        raise ValueError(f"{name}: k_test_train is on {k_test_train.device} but k_train_train "
                         f"is on {device}; move both to the same device.")
    m = k_test_train.shape[0] if k_test_train.ndim else 0
    expected = (m, n, kk, kk) if coupled else (m, n)
    if tuple(k_test_train.shape) != expected:
        kind = "(N, N, K, K)" if coupled else "(N, N)"
        want = "(M, N, K, K)" if coupled else "(M, N)"
        raise ValueError(
            f"{name}: k_test_train must have shape {want} = {expected} to match the {kind} "
            f"training kernel and y_train of shape {y_shape}, got {tuple(k_test_train.shape)}.")
    test_shape = (m, *y_shape[1:])
    f_test0 = _as_outputs(fx_test_0, "fx_test_0", test_shape, dtype, device).reshape(m, kk)
    return f_train0, f_test0, k_test_train.detach().to(dtype), m


def _as_outputs(f, label: str, shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> Tensor:
    """Broadcasts a scalar or tensor of initial outputs to ``shape``."""
    if isinstance(f, (int, float)) and not isinstance(f, bool):
        return torch.full(shape, float(f), dtype=dtype, device=device)
    if not isinstance(f, Tensor):
        raise TypeError(f"predict_fn: {label} must be a tensor or a number, got "
                        f"{type(f).__name__}.")
    if f.device != device:
        raise ValueError(f"predict_fn: {label} is on {f.device} but k_train_train is on "
                         f"{device}; move both to the same device.")
    try:
        return torch.broadcast_to(f.detach().to(dtype), shape)
    except RuntimeError:
        raise ValueError(f"predict_fn: {label} of shape {tuple(f.shape)} does not broadcast to "
                         f"the expected outputs shape {shape}.") from None


def _check_times(t, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Returns ``t`` as a tensor of finite, non-negative times."""
    if isinstance(t, Tensor):
        times = t.detach().to(device=device, dtype=dtype)
    elif isinstance(t, (int, float)) and not isinstance(t, bool):
        times = torch.tensor(float(t), dtype=dtype, device=device)
    else:
        raise TypeError(f"predict_fn: t must be None, a number or a tensor of times, got "
                        f"{type(t).__name__}.")
    if not bool((times >= 0).all()) or not bool(torch.isfinite(times).all()):
        raise ValueError("predict_fn: times t must be finite and >= 0 (use t=None for t = ∞).")
    return times


def _apply_test_kernel(k_test: Tensor, alpha: Tensor, m: int, kk: int, coupled: bool) -> Tensor:
    """Θ(x_test, X) α: (M, N) or (M, N, K, K) kernel times (..., N, K) -> (..., M, K)."""
    if coupled:
        return torch.einsum("mnab,...nb->...ma", k_test, alpha)
    return k_test @ alpha


def _check_learning_rate(learning_rate: Any, name: str) -> None:
    """A real number, finite and > 0."""
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)):
        raise TypeError(f"{name}: learning_rate must be a number > 0, got "
                        f"{type(learning_rate).__name__} {learning_rate!r}.")
    if not math.isfinite(learning_rate) or learning_rate <= 0:
        raise ValueError(f"{name}: learning_rate must be finite and > 0, got {learning_rate!r}.")


def _check_diag_reg(diag_reg: Any, name: str) -> None:
    """A real number, finite and >= 0."""
    if (isinstance(diag_reg, bool) or not isinstance(diag_reg, (int, float))
            or not math.isfinite(diag_reg) or diag_reg < 0):
        raise ValueError(f"{name}: diag_reg must be a float >= 0 (finite), got {diag_reg!r}.")


def _check_tolerances(rtol: Any, atol: Any, dtype: torch.dtype,
                      name: str) -> tuple[float, float]:
    """Fills the dtype's default tolerances and validates them."""
    tight = dtype == torch.float64
    rtol = (1e-9 if tight else 1e-6) if rtol is None else rtol
    atol = (1e-12 if tight else 1e-8) if atol is None else atol
    for label, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name}: {label} must be a number, got {type(v).__name__}.")
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name}: {label} must be finite and > 0, got {v!r}.")
    return float(rtol), float(atol)


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _as_kernels(obj: Any, label: str, name: str) -> dict[str, Tensor]:
    """One tensor -> {"single": it}; a namedtuple/dict/object -> its nngp and ntk fields."""
    if isinstance(obj, Tensor):
        return {"single": obj}
    if isinstance(obj, dict):
        found = {g: obj[g] for g in _GETS if obj.get(g) is not None}
    elif any(hasattr(obj, g) for g in _GETS):
        found = {g: getattr(obj, g) for g in _GETS if getattr(obj, g, None) is not None}
    else:
        raise TypeError(f"{name}: {label} must be a torch.Tensor or a namedtuple/dict with "
                        f"fields 'nngp' and/or 'ntk' (as analytic_ntk(..., get=('nngp', "
                        f"'ntk')) returns), got {type(obj).__name__}.")
    for g, k in found.items():
        if not isinstance(k, Tensor):
            raise TypeError(f"{name}: {label}.{g} must be a torch.Tensor, got "
                            f"{type(k).__name__}.")
    return found


def _canonical_get(get: Any, available: dict, name: str) -> tuple[tuple[str, ...], bool]:
    """(names asked for, whether one name was asked for as a string)."""
    single_tensor = "single" in available
    if get is None:
        if single_tensor:
            return ("nngp",), True
        return tuple(g for g in _GETS if g in available), False
    if isinstance(get, str):
        gets, single = (get,), True
    elif isinstance(get, (tuple, list)) and get and all(isinstance(g, str) for g in get):
        gets, single = tuple(get), False
    else:
        raise TypeError(f"{name}: get must be None, 'nngp', 'ntk' or a tuple of them, got "
                        f"{get!r}.")
    if any(g not in _GETS for g in gets) or len(set(gets)) != len(gets):
        raise ValueError(f"{name}: get must be 'nngp', 'ntk' or a tuple of distinct names among "
                         f"them, got {get!r}.")
    missing = [g for g in gets if not single_tensor and g not in available]
    if missing:
        raise ValueError(f"{name}: get={get!r} asks for {missing} but the training kernels "
                         f"only hold {sorted(available)}; pass them to the parent function.")
    return gets, single


def _check_operator_targets(op, y: Tensor, diag_reg: float, name: str) -> tuple[int, ...]:
    """Validates the targets against a kernel operator; returns y's shape."""
    if not isinstance(y, Tensor):
        raise TypeError(f"{name}: y_train must be a torch.Tensor, got {type(y).__name__}.")
    if y.ndim == 0:
        raise ValueError(f"{name}: y_train must have shape (N,) or (N, *out_shape), got a scalar.")
    if op.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name}: the kernel operator must compute in float32 or float64, "
                         f"got {op.dtype}.")
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"{name}: y_train contains NaN or infinite values.")
    _check_diag_reg(diag_reg, name)
    return tuple(y.shape)
