"""Closed-form training dynamics of gradient descent on the MSE loss, given a kernel.

For a model trained by continuous-time gradient descent on
``L = ||f(X) - Y||² / (2 · Y.numel())`` with learning rate ``lr``, the outputs on
the training inputs follow (Jacot et al. 2018, https://arxiv.org/abs/1806.07572, §5-6)

    d f_train / dt = -lr / Y.numel() · Θ(X, X) (f_train - Y)

and any other input follows ``d f_test / dt = -lr / Y.numel() · Θ(x, X) (f_train - Y)``.
With a constant kernel (the infinite-width limit, or a linearized model) this is
solved exactly in the eigenbasis of ``Θ(X, X)``; at ``t = ∞`` it is kernel
regression. The conventions (time in units of ``learning_rate``, the ``Y.numel()``
normalisation, relative ``diag_reg``) are those of neural-tangents'
``predict.gradient_descent_mse`` with its default ``trace_axes=(-1,)``.
"""
from __future__ import annotations

from typing import Callable, Tuple, Union

import torch
from torch import Tensor

__all__ = ["gradient_descent_mse"]

_Scalar = Union[int, float]
PredictFn = Callable[..., Union[Tensor, Tuple[Tensor, Tensor]]]


def gradient_descent_mse(k_train_train: Tensor, y_train: Tensor, learning_rate: float = 1.0,
                         diag_reg: float = 0.0, *,
                         diag_reg_absolute_scale: bool = False) -> PredictFn:
    """Predicts outputs of continuous-time gradient descent on the MSE loss with a fixed kernel.

    The kernel's shape decides how outputs interact:

    - ``Tensor[N, N]`` (e.g. ``empirical_ntk(..., mode="trace") / K`` or ``analytic_ntk``):
      the kernel is ``Θ ⊗ I_K``; each of the K output columns evolves on its own.
    - ``Tensor[N, N, K, K]`` (``empirical_ntk(..., mode="full")``, layout ``k[n, m, a, b]``):
      the outputs are coupled; the kernel is used as the ``(N·K, N·K)`` matrix
      ``k.permute(0, 2, 1, 3).reshape(N·K, N·K)``.

    The eigendecomposition (finite ``t``) or Cholesky factor (``t=None``) of the
    regularised kernel is computed on first use and cached in the returned function.

    Args:
        k_train_train (Tensor[N, N] or Tensor[N, N, K, K]): symmetric positive
            semi-definite kernel on the training inputs, float32 or float64.
        y_train (Tensor[N] or Tensor[N, *out_shape]): targets; ``K = prod(out_shape)``
            (``K = 1`` for ``Tensor[N]``).
        learning_rate (float): the time ``t`` passed to ``predict_fn`` is in units of
            it (absolute time ``learning_rate · t``), like a number of training steps.
        diag_reg (float): adds ``diag_reg · mean(diag(k)) · I`` to the kernel (ridge).
        diag_reg_absolute_scale (bool): if True, adds ``diag_reg · I`` instead.

    Returns:
        Callable: ``predict_fn(t=None, fx_train_0=0.0, fx_test_0=None, k_test_train=None)``.
        ``t`` is ``None`` (``t = ∞``, kernel regression), a scalar, or a tensor of times of
        shape ``T_shape`` that becomes the leading axes of the result.
        ``fx_train_0`` (scalar or Tensor broadcastable to ``y_train``) are the outputs on the
        training inputs at ``t = 0``; ``None`` means zero and drops them from the result.
        ``fx_test_0`` (scalar or Tensor[M, *out_shape]) are the outputs on M test inputs at
        ``t = 0`` and need ``k_test_train`` (Tensor[M, N] or Tensor[M, N, K, K], matching
        the kind of ``k_train_train``). It returns ``fx_train_t``
        (Tensor[*T_shape, N, *out_shape]) if ``fx_test_0`` is None, ``fx_test_t``
        (Tensor[*T_shape, M, *out_shape]) if ``fx_train_0`` is None, else
        ``(fx_train_t, fx_test_t)``; dtype and device of ``k_train_train``.

    Raises:
        TypeError: a kernel or target that is not a tensor.
        ValueError: shapes that don't fit together, a non-symmetric or non-finite kernel,
            a negative ``diag_reg``, or (``t=None``) a kernel that is not positive definite.

    Example:
        >>> x = torch.randn(20, 3, dtype=torch.float64)
        >>> k = x @ x.T + 1.0
        >>> predict_fn = gradient_descent_mse(k, torch.sin(x[:, :1]))
        >>> predict_fn(torch.tensor([0.0, 10.0, 100.0])).shape
        torch.Size([3, 20, 1])
    """
    k_flat, y_shape, coupled = _check_train(k_train_train, y_train, diag_reg)
    n = y_shape[0]
    kk = 1 if len(y_shape) == 1 else int(torch.Size(y_shape[1:]).numel())
    dtype, device = k_flat.dtype, k_flat.device
    y2 = y_train.detach().to(dtype).reshape(n, kk)
    k_reg = _add_diagonal_regularizer(k_flat, float(diag_reg), diag_reg_absolute_scale)
    normalization = float(n * kk)
    cache: dict[str, Tensor] = {}

    def to_vec(f: Tensor) -> Tensor:
        # (..., N, K) -> the layout the kernel acts on: (..., N, K) for Θ ⊗ I, (..., N·K, 1)
        return f.reshape(*f.shape[:-2], n * kk, 1) if coupled else f

    def from_vec(f: Tensor) -> Tensor:
        return f.reshape(*f.shape[:-2], n, kk) if coupled else f

    def eigh() -> tuple[Tensor, Tensor]:
        if "evecs" not in cache:
            evals, evecs = torch.linalg.eigh(k_reg)
            cache["evals"], cache["evecs"] = evals.clamp_min(0.0), evecs
        return cache["evals"], cache["evecs"]

    def cholesky() -> Tensor:
        if "chol" not in cache:
            chol, info = torch.linalg.cholesky_ex(k_reg)
            if int(info) != 0:
                raise ValueError(
                    "predict_fn: k_train_train (plus diag_reg) is not positive definite, so "
                    "kernel regression (t=None) is undefined. Pass diag_reg > 0 to "
                    "gradient_descent_mse (e.g. 1e-6), or ask for a finite time t.")
            cache["chol"] = chol
        return cache["chol"]

    def predict_fn(t: Tensor | _Scalar | None = None,
                   fx_train_0: Tensor | _Scalar | None = 0.0,
                   fx_test_0: Tensor | _Scalar | None = None,
                   k_test_train: Tensor | None = None):
        """Outputs at time(s) ``t`` (``None`` = ∞); see ``gradient_descent_mse`` for shapes."""
        f_train0, f_test0, k_test, m = _check_predict_inputs(
            fx_train_0, fx_test_0, k_test_train, y_shape, n, kk, coupled, dtype, device)
        want_train, want_test = fx_train_0 is not None, fx_test_0 is not None
        residual = f_train0 - y2  # (N, K)

        if t is None:
            out_train = y2 if want_train else None
            out_test = None
            if want_test:
                alpha = torch.cholesky_solve(to_vec(-residual), cholesky())
                out_test = f_test0 + _apply_test_kernel(k_test, from_vec(alpha), m, kk, coupled)
            t_shape: tuple[int, ...] = ()
        else:
            times = _check_times(t, dtype, device) * float(learning_rate)
            t_shape = tuple(times.shape)
            times = times.reshape(-1, 1)
            evals, evecs = eigh()
            scaled = evals * (times / normalization)  # (T, N·K or N)
            proj = evecs.mT @ to_vec(residual)  # eigen-coordinates of f0 - y
            out_train = out_test = None
            if want_train:
                # f(t) - y = V exp(-Λ t / n) Vᵀ (f0 - y)
                decay = torch.expm1(-scaled).unsqueeze(-1) * proj  # (T, ., .)
                out_train = f_train0 + from_vec(evecs @ decay)
            if want_test:
                # f_test(t) = f_test0 + k_tx V Λ⁻¹ (1 - exp(-Λ t / n)) Vᵀ (y - f0)
                safe = torch.where(evals > 0, evals, torch.ones_like(evals))
                gain = torch.where(evals > 0, -torch.expm1(-scaled) / safe,
                                   (times / normalization).expand_as(scaled))
                alpha = from_vec(evecs @ (gain.unsqueeze(-1) * -proj))
                out_test = f_test0 + _apply_test_kernel(k_test, alpha, m, kk, coupled)

        results = []
        if want_train:
            out_train = out_train.expand(*t_shape, n, kk) if t is None else out_train
            results.append(out_train.reshape(*t_shape, *y_shape))
        if want_test:
            results.append(out_test.reshape(*t_shape, m, *y_shape[1:]))
        return results[0] if len(results) == 1 else tuple(results)

    return predict_fn


# Internal helpers


def _check_train(k: Tensor, y: Tensor, diag_reg: float) -> tuple[Tensor, tuple[int, ...], bool]:
    """Validates the training kernel and targets; returns the 2-D kernel, y's shape, coupling."""
    name = "gradient_descent_mse"
    if not isinstance(k, Tensor):
        raise TypeError(f"{name}: k_train_train must be a torch.Tensor, got {type(k).__name__}.")
    if not isinstance(y, Tensor):
        raise TypeError(f"{name}: y_train must be a torch.Tensor, got {type(y).__name__}.")
    if k.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{name}: k_train_train must be float32 or float64, got {k.dtype}. "
                         "Convert it with k.double() or k.float().")
    if y.ndim == 0:
        raise ValueError(f"{name}: y_train must have shape (N,) or (N, *out_shape), got a scalar.")
    if y.device != k.device:
        raise ValueError(f"{name}: y_train is on {y.device} but k_train_train is on {k.device}; "
                         "move both to the same device.")
    n = y.shape[0]
    kk = int(torch.Size(y.shape[1:]).numel())
    if k.ndim == 2:
        coupled = False
        if tuple(k.shape) != (n, n):
            raise ValueError(
                f"{name}: k_train_train of shape {tuple(k.shape)} does not fit y_train of shape "
                f"{tuple(y.shape)}; an (N, N) kernel needs N = y_train.shape[0] = {n}.")
        k_flat = k.detach()
    elif k.ndim == 4:
        coupled = True
        if tuple(k.shape) != (n, n, kk, kk):
            raise ValueError(
                f"{name}: k_train_train of shape {tuple(k.shape)} does not fit y_train of shape "
                f"{tuple(y.shape)}; an (N, N, K, K) kernel (layout k[n, m, a, b] of "
                f"empirical_ntk(mode='full')) needs ({n}, {n}, {kk}, {kk}) here. For an (N, N) "
                "kernel shared by every output, use mode='trace' and divide by K.")
        k_flat = k.detach().permute(0, 2, 1, 3).reshape(n * kk, n * kk)
    else:
        raise ValueError(
            f"{name}: k_train_train must have shape (N, N) or (N, N, K, K), got "
            f"{tuple(k.shape)}.")
    if not bool(torch.isfinite(k_flat).all()):
        raise ValueError(f"{name}: k_train_train contains NaN or infinite values.")
    scale = float(k_flat.abs().max()) if k_flat.numel() else 0.0
    asym = float((k_flat - k_flat.mT).abs().max()) if k_flat.numel() else 0.0
    # Loose enough for a float32 kernel cast to float64, tight enough to catch k_test_train.
    rtol = max(torch.finfo(k_flat.dtype).eps ** 0.5, 1e-5)
    tol = rtol * max(scale, torch.finfo(k_flat.dtype).tiny)
    if asym > tol:
        raise ValueError(
            f"{name}: k_train_train must be symmetric (Θ(x_n, x_m)_ab = Θ(x_m, x_n)_ba), but "
            f"max |k - kᵀ| = {asym:.3g} with max |k| = {scale:.3g}. Pass the kernel of the "
            "training inputs with themselves (x2=None), not a test-train kernel.")
    if not isinstance(diag_reg, (int, float)) or isinstance(diag_reg, bool) or diag_reg < 0:
        raise ValueError(f"{name}: diag_reg must be a float >= 0, got {diag_reg!r}.")
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
