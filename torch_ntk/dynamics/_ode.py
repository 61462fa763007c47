"""``gradient_descent``: the outputs of continuous-time gradient descent on any loss with a
fixed kernel, integrated numerically with torchdiffeq (imported lazily by ``_import_odeint``),
and the integration helpers it uses (at given times, or over doubling horizons to ``t = ∞``).
Public as ``torch_ntk.dynamics.predict.gradient_descent``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from torch_ntk.dynamics._checks import (PredictFn, _apply_test_kernel, _check_learning_rate,
                                        _check_predict_inputs, _check_times, _check_tolerances,
                                        _check_train, _describe, _Scalar)


def gradient_descent(loss: Callable[[Tensor, Tensor], Tensor], k_train_train: Tensor,
                     y_train: Tensor, learning_rate: float = 1.0, *,
                     rtol: Optional[float] = None, atol: Optional[float] = None,
                     max_steps: int = 100_000) -> PredictFn:
    """Predicts outputs of continuous-time gradient descent on any loss with a fixed kernel.

    The outputs follow the kernel gradient flow (time in units of ``learning_rate``)

        d f_train / dt = -lr · Θ(X, X) ∇_f L(f_train),
        d f_test / dt = -lr · Θ(x, X) ∇_f L(f_train),

    which is integrated numerically with torchdiffeq's adaptive Dormand-Prince 5(4) solver
    (``odeint(..., method="dopri5")``): it keeps the error of every step under
    ``atol + rtol · |f|``, runs on whatever device the kernel is on (CPU or GPU, the state
    never leaves it) and needs only evaluations of ``∇_f L``, which autograd provides for any
    differentiable ``loss``. With ``loss = 0.5 * ((fx - y) ** 2).sum() / y.numel()`` this is
    the dynamics ``gradient_descent_mse`` solves in closed form. Kernel shapes and the
    meaning of ``t`` are those of ``gradient_descent_mse``.

    Needs the ``ode`` extra: ``pip install 'torch_ntk[ode]'`` (torchdiffeq).

    Args:
        loss (callable): ``loss(fx, y) -> Tensor[]``, a differentiable function of the outputs
            ``fx`` (Tensor[N, *out_shape]) and the targets, summed or averaged over the batch.
        k_train_train (Tensor[N, N] or Tensor[N, N, K, K]): symmetric kernel on the training
            inputs, float32 or float64 (layouts as in ``gradient_descent_mse``).
        y_train (Tensor[N] or Tensor[N, *out_shape]): targets, passed to ``loss`` as they are.
        learning_rate (float): ``t`` is in units of it (absolute time ``learning_rate · t``).
        rtol (float, optional): relative tolerance of the solver (default 1e-9 for float64,
            1e-6 for float32).
        atol (float, optional): absolute tolerance of the solver (default 1e-12 for float64,
            1e-8 for float32).
        max_steps (int): most evaluations of the right-hand side per call of ``predict_fn``
            (divided by 6, about the number of solver steps); more raises an error.

    Returns:
        Callable: ``predict_fn(t=None, fx_train_0=0.0, fx_test_0=None, k_test_train=None)``,
        with the arguments and results of ``gradient_descent_mse``'s ``predict_fn``. Times may
        come in any order. ``t=None`` means ``t = ∞``: the flow is integrated over doubling
        horizons until the outputs move by less than ``10 · (atol + rtol · max|f|)`` over a
        horizon, and an error is raised if that does not happen within ``max_steps`` (e.g.
        cross-entropy on separable data, whose outputs grow without bound).

    Raises:
        ImportError: torchdiffeq is not installed.
        TypeError: ``loss`` not callable, a kernel or target that is not a tensor, a
            ``learning_rate`` that is not a number.
        ValueError: shapes that don't fit together, a non-symmetric or non-finite kernel or
            target, a ``learning_rate`` that is not finite and > 0, bad tolerances; from
            ``predict_fn``: a loss that is not a scalar or has non-finite gradients, or an
            integration that needs more than ``max_steps`` steps.

    Example:
        >>> x = torch.randn(10, 3, dtype=torch.float64)
        >>> k = x @ x.T + 1.0
        >>> y = torch.nn.functional.one_hot(torch.arange(10) % 3).double()
        >>> ce = lambda f, y: -(y * torch.log_softmax(f, -1)).sum() / y.shape[0]
        >>> gradient_descent(ce, k, y)(torch.tensor([1.0, 5.0])).shape
        torch.Size([2, 10, 3])
    """
    name = "gradient_descent"
    odeint = _import_odeint(name)
    if not callable(loss):
        raise TypeError(f"{name}: loss must be a callable loss(fx, y) -> scalar tensor, got "
                        f"{type(loss).__name__}.")
    _check_learning_rate(learning_rate, name)
    k_flat, y_shape, coupled = _check_train(k_train_train, y_train, 0.0, name)
    dtype, device = k_flat.dtype, k_flat.device
    rtol, atol = _check_tolerances(rtol, atol, dtype, name)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"{name}: max_steps must be an integer >= 1, got {max_steps!r}.")
    n = y_shape[0]
    kk = 1 if len(y_shape) == 1 else int(torch.Size(y_shape[1:]).numel())
    y_loss = y_train.detach().to(dtype)

    def loss_grad(f_train: Tensor) -> Tensor:
        """∇_f L at outputs f_train (N, K) -> (N, K)."""
        with torch.enable_grad():
            f = f_train.detach().reshape(y_shape).requires_grad_(True)
            value = loss(f, y_loss)
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise ValueError(f"predict_fn: loss(fx, y) must return a scalar tensor, got "
                                 f"{_describe(value)}. Sum or average over the batch.")
            (grad,) = torch.autograd.grad(value.reshape(()), f, allow_unused=True)
        if grad is None:
            return torch.zeros(n, kk, dtype=dtype, device=device)
        return grad.reshape(n, kk)

    def predict_fn(t: Tensor | _Scalar | None = None,
                   fx_train_0: Tensor | _Scalar | None = 0.0,
                   fx_test_0: Tensor | _Scalar | None = None,
                   k_test_train: Tensor | None = None):
        """Outputs at time(s) ``t`` (``None`` = ∞); see ``gradient_descent`` for shapes."""
        f_train0, f_test0, k_test, m = _check_predict_inputs(
            fx_train_0, fx_test_0, k_test_train, y_shape, n, kk, coupled, dtype, device)
        want_train, want_test = fx_train_0 is not None, fx_test_0 is not None
        split = n * kk
        budget = {"left": 6 * max_steps}

        def velocity(_, state: Tensor) -> Tensor:
            budget["left"] -= 1
            if budget["left"] < 0:
                raise _OutOfSteps()
            grad = loss_grad(state[:split].reshape(n, kk))
            if not bool(torch.isfinite(grad).all()):
                raise ValueError("predict_fn: the gradient of loss(fx, y) is not finite; "
                                 "check the loss (e.g. log of 0) and the initial outputs.")
            d_train = _apply_test_kernel(k_flat_view, grad, n, kk, coupled)
            parts = [-d_train.reshape(-1)]
            if want_test:
                parts.append(-_apply_test_kernel(k_test, grad, m, kk, coupled).reshape(-1))
            return torch.cat(parts)

        k_flat_view = (k_flat.reshape(n, kk, n, kk).permute(0, 2, 1, 3) if coupled
                       else k_flat)
        state0 = torch.cat([f_train0.reshape(-1)]
                           + ([f_test0.reshape(-1)] if want_test else []))
        solve = lambda s0, ts: odeint(velocity, s0, ts, rtol=rtol, atol=atol,  # noqa: E731
                                      method="dopri5")
        try:
            if t is None:
                states = _integrate_to_convergence(solve, state0, rtol, atol, k_flat)[None]
                t_shape: tuple[int, ...] = ()
            else:
                times = _check_times(t, dtype, device) * float(learning_rate)
                t_shape = tuple(times.shape)
                states = _integrate_at(solve, state0, times.reshape(-1))
        except _OutOfSteps:
            why = (" without converging (t=None means t = ∞; the loss may have no minimum, "
                   "e.g. cross-entropy on separable data: pass a finite t)" if t is None else "")
            raise ValueError(
                f"predict_fn: the gradient flow needed more than max_steps={max_steps} solver "
                f"steps{why}. Ask for a smaller t, loosen rtol/atol, or raise max_steps in "
                "gradient_descent.") from None
        results = []
        if want_train:
            results.append(states[:, :split].reshape(*t_shape, *y_shape))
        if want_test:
            results.append(states[:, split:].reshape(*t_shape, m, *y_shape[1:]))
        return results[0] if len(results) == 1 else tuple(results)

    return predict_fn


# Internal helpers


class _OutOfSteps(Exception):
    """The solver used up its budget of right-hand-side evaluations."""


def _import_odeint(name: str):
    """torchdiffeq's odeint, or an ImportError naming the ``ode`` extra."""
    try:
        from torchdiffeq import odeint
    except ImportError as exc:
        raise ImportError(
            f"{name}: integrating the gradient flow of a general loss needs torchdiffeq, "
            "which the library itself doesn't. Install the ode extra: "
            "pip install 'torch_ntk[ode]' (or pip install torchdiffeq).") from exc
    return odeint


def _integrate_at(solve: Callable, state0: Tensor, times: Tensor) -> Tensor:
    """States (T, S) at the absolute ``times`` (any order, repeats allowed)."""
    uniq = torch.unique(times)  # sorted
    if float(uniq[-1]) == 0.0:
        return state0.expand(times.shape[0], -1).clone()
    grid = uniq if float(uniq[0]) == 0.0 else torch.cat([uniq.new_zeros(1), uniq])
    states = solve(state0, grid)[grid.shape[0] - uniq.shape[0]:]  # (len(uniq), S)
    return states[torch.searchsorted(uniq, times)]


def _integrate_to_convergence(solve: Callable, state0: Tensor, rtol: float, atol: float,
                              k_flat: Tensor) -> Tensor:
    """The state at t = ∞: integrates over doubling horizons until it stops moving."""
    horizon = 1.0 / max(float(torch.diagonal(k_flat).abs().mean()), 1e-30)
    t_now, state = 0.0, state0
    for _ in range(1100):  # 2^1100 horizons: the step budget runs out first
        t_next = t_now + max(t_now, horizon)
        grid = torch.tensor([t_now, t_next], dtype=state0.dtype, device=state0.device)
        nxt = solve(state, grid)[-1]
        change = float((nxt - state).abs().max()) if nxt.numel() else 0.0
        if change <= 10.0 * (atol + rtol * float(nxt.abs().max() if nxt.numel() else 0.0)):
            return nxt
        t_now, state = t_next, nxt
    raise _OutOfSteps()
