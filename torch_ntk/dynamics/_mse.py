"""``gradient_descent_mse``: the closed-form outputs of continuous-time gradient descent on
the MSE loss with a fixed kernel, solved in the eigenbasis of the regularised training kernel
(finite times) or by its Cholesky factor (``t = ∞``, kernel regression). Public as
``torch_ntk.dynamics.predict.gradient_descent_mse``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from torch_ntk.dynamics._checks import (PredictFn, _add_diagonal_regularizer,
                                        _apply_test_kernel, _check_learning_rate,
                                        _check_operator_targets, _check_predict_inputs,
                                        _check_times, _check_train, _Scalar)
from torch_ntk.dynamics._iterative import OperatorSystem, is_operator


def gradient_descent_mse(k_train_train: Tensor, y_train: Tensor, learning_rate: float = 1.0,
                         diag_reg: float = 0.0, *, diag_reg_absolute_scale: bool = False,
                         rtol: float = 1e-6, maxiter: int | None = None,
                         preconditioner_rank: int = 1024) -> PredictFn:
    """Predicts outputs of continuous-time gradient descent on the MSE loss with a fixed kernel.

    The kernel's shape decides how outputs interact:

    - ``Tensor[N, N]`` (e.g. ``empirical_ntk(..., mode="trace") / K`` or ``analytic_ntk``):
      the kernel is ``Θ ⊗ I_K``; each of the K output columns evolves on its own.
    - ``Tensor[N, N, K, K]`` (``empirical_ntk(..., mode="full")``, layout ``k[n, m, a, b]``):
      the outputs are coupled; the kernel is used as the ``(N·K, N·K)`` matrix
      ``k.permute(0, 2, 1, 3).reshape(N·K, N·K)``.
    - ``torch_ntk.NTKOperator`` (``mode="trace"`` like ``(N, N)``, ``"full"`` like
      ``(N, N, K, K)``): never formed. ``t=None`` solves by conjugate gradients,
      preconditioned by the operator's random features, finite ``t`` by Lanczos; both stop at ``rtol`` and
      ``predict_fn.last`` tells the iterations and residual reached (also logged at INFO).

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
        rtol (float), maxiter (int, optional), preconditioner_rank (int): for an operator
            only: the relative residual to reach, the iterations allowed (default: 10 times the
            operator's size) and the preconditioner's rank, the width of its random
            features (0: none).

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
        TypeError: a kernel or target that is not a tensor, a ``learning_rate`` or
            ``diag_reg`` that is not a number.
        ValueError: shapes that don't fit together, a non-symmetric or non-finite kernel or
            target, a ``learning_rate`` that is not finite and > 0, a negative or NaN
            ``diag_reg``, or (``t=None``) a kernel that is not positive definite.

    Example:
        >>> x = torch.randn(20, 3, dtype=torch.float64)
        >>> k = x @ x.T + 1.0
        >>> predict_fn = gradient_descent_mse(k, torch.sin(x[:, :1]))
        >>> predict_fn(torch.tensor([0.0, 10.0, 100.0])).shape
        torch.Size([3, 20, 1])
    """
    _check_learning_rate(learning_rate, "gradient_descent_mse")
    if is_operator(k_train_train):
        return _operator_predict_fn(k_train_train, y_train, learning_rate, diag_reg,
                                    diag_reg_absolute_scale, rtol, maxiter, preconditioner_rank)
    k_flat, y_shape, coupled = _check_train(k_train_train, y_train, diag_reg)
    k_reg = _add_diagonal_regularizer(k_flat, float(diag_reg), diag_reg_absolute_scale)
    return _predict_fn(_DenseKernel(k_reg), y_train, y_shape, coupled, learning_rate)


class _DenseKernel:
    """The regularised kernel as a matrix: Cholesky solves (``t = ∞``) and functions of it
    through its eigendecomposition (finite ``t``), each computed on first use and kept."""

    def __init__(self, k_reg: Tensor) -> None:
        self.k_reg, self.dtype, self.device = k_reg, k_reg.dtype, k_reg.device
        self.last = None
        self._cache: dict[str, Tensor] = {}

    def solve(self, b: Tensor) -> Tensor:
        if "chol" not in self._cache:
            chol, info = torch.linalg.cholesky_ex(self.k_reg)
            if int(info) != 0:
                raise ValueError(
                    "predict_fn: k_train_train (plus diag_reg) is not positive definite, so "
                    "kernel regression (t=None) is undefined. Pass diag_reg > 0 to "
                    "gradient_descent_mse (e.g. 1e-6), or ask for a finite time t.")
            self._cache["chol"] = chol
        return torch.cholesky_solve(b, self._cache["chol"])

    def functions(self, b: Tensor, fns) -> Tensor:
        """``f(A) b`` for the functions ``fns`` gives on the eigenvalues: Tensor[F, size, r]."""
        if "evecs" not in self._cache:
            evals, evecs = torch.linalg.eigh(self.k_reg)
            self._cache["evals"], self._cache["evecs"] = evals.clamp_min(0.0), evecs
        evals, evecs = self._cache["evals"], self._cache["evecs"]
        return evecs @ (fns(evals).unsqueeze(-1) * (evecs.mT @ b))


def _predict_fn(kernel, y_train: Tensor, y_shape: tuple, coupled: bool,
                learning_rate: float) -> PredictFn:
    """``predict_fn`` of ``gradient_descent_mse`` over a kernel that solves (``kernel.solve``)
    and applies functions of itself (``kernel.functions``): a matrix or an operator."""
    n = y_shape[0]
    kk = 1 if len(y_shape) == 1 else int(torch.Size(y_shape[1:]).numel())
    dtype, device = kernel.dtype, kernel.device
    y2 = y_train.detach().to(device, dtype).reshape(n, kk)
    normalization = float(n * kk)

    def to_vec(f: Tensor) -> Tensor:
        # (..., N, K) -> the layout the kernel acts on: (..., N, K) for Θ ⊗ I, (..., N·K, 1)
        return f.reshape(*f.shape[:-2], n * kk, 1) if coupled else f

    def from_vec(f: Tensor) -> Tensor:
        return f.reshape(*f.shape[:-2], n, kk) if coupled else f

    def predict_fn(t: Tensor | _Scalar | None = None,
                   fx_train_0: Tensor | _Scalar | None = 0.0,
                   fx_test_0: Tensor | _Scalar | None = None,
                   k_test_train: Tensor | None = None):
        """Outputs at time(s) ``t`` (``None`` = ∞); see ``gradient_descent_mse`` for shapes."""
        f_train0, f_test0, k_test, m = _check_predict_inputs(
            fx_train_0, fx_test_0, k_test_train, y_shape, n, kk, coupled, dtype, device)
        want_train, want_test = fx_train_0 is not None, fx_test_0 is not None
        residual = to_vec(f_train0 - y2)  # f0 - y in the kernel's layout
        out_train = out_test = None
        if t is None:
            t_shape: tuple[int, ...] = ()
            if want_train:
                out_train = y2
            if want_test:
                alpha = from_vec(kernel.solve(-residual))
                out_test = f_test0 + _apply_test_kernel(k_test, alpha, m, kk, coupled)
        else:
            times = _check_times(t, dtype, device) * float(learning_rate)
            t_shape = tuple(times.shape)
            s = (times.reshape(-1) / normalization)[:, None]               # (T, 1)
            if want_train:   # f(t) - y = exp(-Θ s) (f0 - y)
                decay = kernel.functions(residual, lambda lam: torch.expm1(-lam * s))
                out_train = f_train0 + from_vec(decay)
            if want_test:    # f_test(t) = f_test0 + k_tx Θ⁻¹ (1 - exp(-Θ s)) (y - f0)
                alpha = from_vec(kernel.functions(-residual, lambda lam: _gain(lam, s)))
                out_test = f_test0 + _apply_test_kernel(k_test, alpha, m, kk, coupled)
        predict_fn.last = kernel.last
        results = []
        if want_train:
            out_train = out_train.expand(*t_shape, n, kk) if t is None else out_train
            results.append(out_train.reshape(*t_shape, *y_shape))
        if want_test:
            results.append(out_test.reshape(*t_shape, m, *y_shape[1:]))
        return results[0] if len(results) == 1 else tuple(results)

    predict_fn.last = None
    return predict_fn


def _gain(lam: Tensor, s: Tensor) -> Tensor:
    """``(1 - exp(-λ s)) / λ`` (T, m) for eigenvalues λ (m) and times s (T, 1); ``s`` at 0."""
    lam = lam.clamp_min(0)
    safe = torch.where(lam > 0, lam, torch.ones_like(lam))
    return torch.where(lam > 0, -torch.expm1(-lam * s) / safe, s.expand(-1, lam.shape[0]))


def _operator_predict_fn(op, y_train: Tensor, learning_rate: float, diag_reg: float,
                         absolute: bool, rtol: float, maxiter: int | None,
                         rank: int) -> PredictFn:
    """``gradient_descent_mse`` for a kernel operator (see there)."""
    name = "gradient_descent_mse"
    y_shape = _check_operator_targets(op, y_train, diag_reg, name)
    system = OperatorSystem(op, y_shape, float(diag_reg), absolute, rtol=rtol,
                            maxiter=maxiter, rank=rank, name=name)
    return _predict_fn(system, y_train, y_shape, system.coupled, learning_rate)
