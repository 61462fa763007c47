"""Training dynamics of gradient descent given a kernel, and Gaussian-process inference.

``gradient_descent_mse`` (closed form, below), ``gradient_descent`` (any loss, numerical ODE
integration), ``gp_inference`` (NNGP posterior and NTK ensemble at t = ∞) and
``gradient_descent_mse_ensemble`` (the infinite ensemble's mean and covariance at any t).

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

import collections
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["Gaussian", "gradient_descent", "gradient_descent_mse",
           "gradient_descent_mse_ensemble", "gp_inference"]

_Scalar = Union[int, float]
_GETS = ("nngp", "ntk")
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


class Gaussian(NamedTuple):
    """Mean and covariance of a Gaussian over outputs.

    Attributes:
        mean (Tensor[*T_shape, M, *out_shape]): the mean outputs.
        covariance (Tensor[*T_shape, M, M] or Tensor[*T_shape, M, M, K, K] or None): the
            covariance between inputs (shared by every output for ``(N, N)`` kernels);
            None when it was not asked for.
    """

    mean: Tensor
    covariance: Optional[Tensor]


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


def gp_inference(k_train_train: Any, y_train: Tensor, diag_reg: float = 0.0, *,
                 diag_reg_absolute_scale: bool = False) -> Callable[..., Any]:
    """Posterior of the NNGP, and the distribution of the NTK ensemble trained to ``t = ∞``.

    With ``K`` the NNGP (the prior covariance of the network at initialisation), ``Θ`` the
    NTK, ``X`` the training and ``*`` the test inputs, and ``reg`` the ridge ``diag_reg``:

    - ``"nngp"`` (exact Bayesian posterior of the infinitely wide network):
      mean ``K_*X (K_XX + reg)⁻¹ Y``, covariance ``K_** − K_*X (K_XX + reg)⁻¹ K_X*``.
    - ``"ntk"`` (infinite ensemble of infinitely wide networks trained by gradient flow on
      the MSE loss to ``t = ∞``; Lee et al. 2019, https://arxiv.org/abs/1902.06720, Eq. 16):
      mean ``Θ_*X (Θ_XX + reg)⁻¹ Y``, covariance ``K_** + Θ_*X Θ⁻¹ K_XX Θ⁻¹ Θ_X* −
      (Θ_*X Θ⁻¹ K_X* + K_*X Θ⁻¹ Θ_X*)`` with ``Θ⁻¹ = (Θ_XX + reg)⁻¹``.

    Same conventions as neural-tangents' ``predict.gp_inference`` with ``trace_axes=(-1,)``:
    ``(N, N)`` kernels are shared by every output column; ``(N, N, K, K)`` kernels (layout
    ``k[n, m, a, b]``) couple the outputs.

    Args:
        k_train_train (Tensor or namedtuple or dict): the kernel(s) on the training inputs:
            one Tensor[N, N] (or [N, N, K, K]), or an object with fields ``nngp`` and/or
            ``ntk`` such as ``analytic_ntk(x, get=("nngp", "ntk"))``. The NTK covariance
            needs both.
        y_train (Tensor[N] or Tensor[N, *out_shape]): targets.
        diag_reg (float): ridge added to each training kernel, ``diag_reg · mean(diag(k))``.
        diag_reg_absolute_scale (bool): if True, the ridge is ``diag_reg`` itself.

    Returns:
        Callable: ``predict_fn(get=None, k_test_train=None, k_test_test=None)``. ``get`` is
        ``"nngp"``, ``"ntk"`` or a tuple of them; None means every kernel ``k_train_train``
        holds (for one tensor: that tensor). ``k_test_train`` (Tensor[M, N] or [M, N, K, K],
        or kernels as above) relates M test inputs to the training inputs; None predicts on
        the training inputs, ``Gaussian(y_train, 0)``. ``k_test_test`` (Tensor[M, M] or
        [M, M, K, K], or kernels; only the NNGP is used) asks for the covariance (with
        ``k_test_train=None`` any value, e.g. True, does). For a
        string ``get`` the result is a ``Gaussian(mean, covariance)``, for a tuple (or None
        with several kernels) a namedtuple of them with the fields of ``get``; ``mean`` is
        Tensor[M, *out_shape], ``covariance`` Tensor[M, M] (or [M, M, K, K]) or None
        without ``k_test_test``.

    Raises:
        TypeError: kernels that are neither tensors nor objects with ``nngp``/``ntk``.
        ValueError: shapes that don't fit together, non-symmetric or non-finite kernels,
            a negative or NaN ``diag_reg``; from ``predict_fn``: an unknown ``get``, a
            kernel that is missing, or a training kernel that is not positive definite.

    Example:
        >>> x, xt = torch.randn(20, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
        >>> kw = dict(depth=3, get=("nngp", "ntk"))
        >>> fn = gp_inference(torch_ntk.analytic_ntk(x, **kw), torch.sin(x[:, :1]), 1e-6)
        >>> out = fn(None, torch_ntk.analytic_ntk(xt, x, **kw), torch_ntk.analytic_ntk(xt, **kw))
        >>> out.ntk.mean.shape, out.ntk.covariance.shape
        (torch.Size([5, 1]), torch.Size([5, 5]))
    """
    name = "gp_inference"
    trains = _as_kernels(k_train_train, "k_train_train", name)
    if not trains:
        raise ValueError(f"{name}: k_train_train holds neither an nngp nor an ntk kernel.")
    checked = {g: _check_train(k, y_train, diag_reg, name, f"k_train_train.{g}")
               for g, k in trains.items() if g != "single"}
    if "single" in trains:
        checked = {"single": _check_train(trains["single"], y_train, diag_reg, name)}
    y_shape = next(iter(checked.values()))[1]
    coupled = next(iter(checked.values()))[2]
    if len({c[2] for c in checked.values()}) != 1:
        raise ValueError(f"{name}: k_train_train.nngp and .ntk must both be (N, N) or both "
                         "(N, N, K, K).")
    n = y_shape[0]
    kk = 1 if len(y_shape) == 1 else int(torch.Size(y_shape[1:]).numel())
    dtype = next(iter(checked.values()))[0].dtype
    y2 = y_train.detach().to(dtype).reshape(n, kk)
    y_vec = y2.reshape(n * kk, 1) if coupled else y2
    regs = {g: _add_diagonal_regularizer(c[0], float(diag_reg), diag_reg_absolute_scale)
            for g, c in checked.items()}
    chols: dict[str, Tensor] = {}

    def solve(g: str, rhs: Tensor) -> Tensor:
        if g not in chols:
            chols[g] = _cholesky(regs[g], "gp_inference")
        return torch.cholesky_solve(rhs, chols[g])

    def predict_fn(get: Union[str, Sequence[str], None] = None, k_test_train: Any = None,
                   k_test_test: Any = None):
        """Posterior mean (and covariance) per kernel; see ``gp_inference``."""
        gets, single = _canonical_get(get, trains, "predict_fn")
        tests = None if k_test_train is None else _as_kernels(k_test_train, "k_test_train",
                                                              "predict_fn")
        priors = None
        if k_test_test is not None:  # on the training inputs any value asks for the (zero) cov
            priors = ({} if tests is None
                      else _as_kernels(k_test_test, "k_test_test", "predict_fn"))
        out = {}
        for g in gets:
            out[g] = _posterior(g, "single" in trains, regs, checked, solve, y_vec, y_shape,
                                tests, priors, n, kk, coupled, dtype)
        if single:
            return out[gets[0]]
        return collections.namedtuple("Gaussians", gets)(**out)

    return predict_fn


def gradient_descent_mse_ensemble(kernel_fn: Callable[..., Any], x_train: Tensor,
                                  y_train: Tensor, learning_rate: float = 1.0,
                                  diag_reg: float = 0.0, *,
                                  diag_reg_absolute_scale: bool = False) -> Callable[..., Any]:
    """Mean and covariance of an infinite ensemble of infinitely wide networks trained on MSE.

    The networks start as draws of the NNGP prior ``f_0 ~ GP(0, K)`` and follow the
    gradient flow of ``gradient_descent_mse`` with the NTK Θ (``"ntk"``) or with the NNGP
    (``"nngp"``: only the last layer trained). With ``s = learning_rate · t / Y.numel()``,
    ``E = exp(-Θ s)`` and ``A(t) = Θ_*X Θ⁻¹ (I − E)`` (Θ regularised by ``diag_reg``), the
    outputs on test inputs are Gaussian with (Lee et al. 2019, https://arxiv.org/abs/1902.06720,
    Eqs. 15-16; neural-tangents' ``predict.gradient_descent_mse_ensemble``)

        mean(t) = A(t) Y,
        cov(t)  = K_** + A(t) K_XX A(t)ᵀ − (A(t) K_X* + K_*X A(t)ᵀ),

    and on the training inputs ``mean = (I − E) Y``, ``cov = E K_XX E``. For ``"nngp"``
    (Θ = K) the prior is the regularised ``K`` itself, so that ``cov = K_** − K_*X K⁻¹
    (I − E²) K_X*``. ``t = ∞`` is ``gp_inference``.

    Args:
        kernel_fn (callable): ``kernel_fn(x1, x2, get)`` returning a tensor for one name in
            ``get`` and a namedtuple (or dict) with fields ``nngp``/``ntk`` for a tuple, like
            ``functools.partial(torch_ntk.analytic_ntk, depth=3)``; ``x2=None`` means ``x1``.
            Kernels may be Tensor[N1, N2] or Tensor[N1, N2, K, K].
        x_train (Tensor[N, ...]): training inputs.
        y_train (Tensor[N] or Tensor[N, *out_shape]): targets.
        learning_rate (float): ``t`` is in units of it.
        diag_reg (float): relative ridge as in ``gradient_descent_mse``.
        diag_reg_absolute_scale (bool): if True, the ridge is ``diag_reg`` itself.

    Returns:
        Callable: ``predict_fn(t=None, x_test=None, get=None, compute_cov=False)``. ``t`` is
        None (∞), a number or a tensor of times (leading axes ``T_shape`` of the results);
        ``x_test`` (Tensor[M, ...]) or None for the training inputs; ``get`` is ``"nngp"``,
        ``"ntk"``, a tuple of them, or None for both. Per kernel, the result is the mean
        (Tensor[*T_shape, M, *out_shape]) or, with ``compute_cov=True``, a
        ``Gaussian(mean, covariance)`` with covariance Tensor[*T_shape, M, M] (or
        [*T_shape, M, M, K, K]); a namedtuple of them for a tuple ``get``.

    Raises:
        TypeError: ``kernel_fn`` not callable, ``x_train``/``y_train`` not tensors, a
            ``learning_rate`` that is not a number.
        ValueError: shapes that don't fit, a ``learning_rate`` that is not finite and > 0,
            a negative or NaN ``diag_reg``; from ``predict_fn``: bad times or ``get``.

    Example:
        >>> import functools
        >>> x, xt = torch.randn(20, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
        >>> kernel_fn = functools.partial(torch_ntk.analytic_ntk, depth=3, b_std=0.1)
        >>> fn = gradient_descent_mse_ensemble(kernel_fn, x, torch.sin(x[:, :1]))
        >>> out = fn(torch.tensor([1.0, 10.0]), xt, "ntk", compute_cov=True)
        >>> out.mean.shape, out.covariance.shape
        (torch.Size([2, 5, 1]), torch.Size([2, 5, 5]))
    """
    name = "gradient_descent_mse_ensemble"
    if not callable(kernel_fn):
        raise TypeError(f"{name}: kernel_fn must be callable as kernel_fn(x1, x2, get), got "
                        f"{type(kernel_fn).__name__}.")
    for label, v in (("x_train", x_train), ("y_train", y_train)):
        if not isinstance(v, Tensor):
            raise TypeError(f"{name}: {label} must be a torch.Tensor, got {type(v).__name__}.")
    _check_learning_rate(learning_rate, name)
    _check_diag_reg(diag_reg, name)
    if y_train.ndim == 0 or x_train.ndim == 0 or y_train.shape[0] != x_train.shape[0]:
        raise ValueError(f"{name}: x_train and y_train must have the same number N of rows, "
                         f"got shapes {tuple(x_train.shape)} and {tuple(y_train.shape)}.")
    train_cache: dict[str, Tensor] = {}
    eig_cache: dict[str, tuple[Tensor, Tensor]] = {}
    inf_cache: dict[tuple[str, ...], Callable[..., Any]] = {}

    def train_kernels(gets: Sequence[str]) -> dict[str, Tensor]:
        missing = tuple(g for g in gets if g not in train_cache)
        if missing:
            train_cache.update(_call_kernel_fn(kernel_fn, x_train, None, missing, name))
        return {g: train_cache[g] for g in gets}

    def gd(g: str):
        """gradient_descent_mse-style validation and eigenbasis of the regularised kernel g."""
        if g not in eig_cache:
            k_flat, _, _ = _check_train(train_kernels((g,))[g], y_train, diag_reg, name,
                                        f"kernel_fn(x_train, None).{g}")
            k_reg = _add_diagonal_regularizer(k_flat, float(diag_reg), diag_reg_absolute_scale)
            evals, evecs = torch.linalg.eigh(k_reg)
            eig_cache[g] = evals.clamp_min(0.0), evecs
        return eig_cache[g]

    def predict_fn(t: Tensor | _Scalar | None = None, x_test: Tensor | None = None,
                   get: Union[str, Sequence[str], None] = None, compute_cov: bool = False):
        """Ensemble mean (and covariance) at time(s) ``t``; see the parent function."""
        gets, single = _canonical_get(get, {"nngp": 1, "ntk": 1}, "predict_fn")
        if not isinstance(compute_cov, bool):
            raise TypeError(f"predict_fn: compute_cov must be a bool, got {compute_cov!r}.")
        needed = tuple(g for g in ("nngp", "ntk")
                       if g in gets or (g == "nngp" and compute_cov))
        k_dd = train_kernels(needed)
        k_td = k_tt = None
        if x_test is not None:
            if not isinstance(x_test, Tensor):
                raise TypeError(f"predict_fn: x_test must be a torch.Tensor or None, got "
                                f"{type(x_test).__name__}.")
            k_td = _call_kernel_fn(kernel_fn, x_test, x_train, needed, name)
            if compute_cov:
                k_tt = _call_kernel_fn(kernel_fn, x_test, None, ("nngp",), name)["nngp"]
        if t is None:
            if needed not in inf_cache:
                inf_cache[needed] = gp_inference(k_dd, y_train, diag_reg,
                                                 diag_reg_absolute_scale=diag_reg_absolute_scale)
            k_tt_arg = k_tt if x_test is not None else (k_dd["nngp"] if compute_cov else None)
            res = inf_cache[needed](tuple(gets), k_td, k_tt_arg)
            out = {g: (getattr(res, g) if compute_cov else getattr(res, g).mean) for g in gets}
        else:
            out = {g: _ensemble_at(g, gd(g), t, k_dd, k_td, k_tt, y_train, learning_rate,
                                   compute_cov) for g in gets}
        if single:
            return out[gets[0]]
        return collections.namedtuple("Gaussians", gets)(**out)

    return predict_fn


# Internal helpers


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


def _cholesky(k_reg: Tensor, parent: str) -> Tensor:
    chol, info = torch.linalg.cholesky_ex(k_reg)
    if int(info) != 0:
        raise ValueError(f"predict_fn: the training kernel (plus diag_reg) is not positive "
                         f"definite, so it cannot be inverted. Pass diag_reg > 0 to {parent} "
                         "(e.g. 1e-6).")
    return chol


def _flat_cross(k: Tensor, rows: Optional[int], n: int, kk: int, coupled: bool, label: str,
                dtype: torch.dtype, device: torch.device) -> tuple[Tensor, int]:
    """(M, N) or (M, N, K, K) kernel -> (M·K', N·K') matrix (K' = K if coupled else 1), M."""
    if not isinstance(k, Tensor):
        raise TypeError(f"predict_fn: {label} must be a torch.Tensor, got {type(k).__name__}.")
    m = k.shape[0] if k.ndim else 0
    cols = n if rows is None else rows
    expected = (m, cols, kk, kk) if coupled else (m, cols)
    if tuple(k.shape) != expected or (rows is not None and m != rows):
        want = "(M, N, K, K)" if coupled else "(M, N)"
        if rows is not None:
            want = "(M, M, K, K)" if coupled else "(M, M)"
            expected = (rows, rows, kk, kk) if coupled else (rows, rows)
        raise ValueError(f"predict_fn: {label} must have shape {want} = {expected} to match "
                         f"the training kernels, got {tuple(k.shape)}.")
    if k.device != device:
        raise ValueError(f"predict_fn: {label} is on {k.device} but the training kernel is on "
                         f"{device}; move both to the same device.")
    k = k.detach().to(dtype)
    if not bool(torch.isfinite(k).all()):
        raise ValueError(f"predict_fn: {label} contains NaN or infinite values.")
    if coupled:
        k = k.permute(0, 2, 1, 3).reshape(m * kk, expected[1] * kk)
    return k, m


def _unflat_cov(cov: Tensor, m: int, kk: int, coupled: bool) -> Tensor:
    """(..., M·K', M·K') -> (..., M, M) or (..., M, M, K, K); symmetrised."""
    cov = 0.5 * (cov + cov.mT)
    if not coupled:
        return cov
    cov = cov.reshape(*cov.shape[:-2], m, kk, m, kk)
    return cov.movedim(-3, -2)


def _posterior(g: str, is_single: bool, regs: dict, checked: dict, solve: Callable,
               y_vec: Tensor, y_shape: tuple[int, ...], tests: Optional[dict],
               priors: Optional[dict], n: int, kk: int, coupled: bool,
               dtype: torch.dtype) -> Gaussian:
    """gp_inference's result for kernel ``g``."""
    key = "single" if is_single else g
    device = regs[key].device
    if tests is None:  # the training inputs: N(y_train, 0)
        cov = None
        if priors is not None:
            side = n * kk if coupled else n
            cov = _unflat_cov(torch.zeros(side, side, dtype=dtype, device=device), n, kk,
                              coupled)
        return Gaussian(y_vec.reshape(y_shape).clone(), cov)
    test_key = "single" if "single" in tests else g
    if test_key not in tests:
        raise ValueError(f"predict_fn: k_test_train has no {g!r} kernel; pass a tensor or an "
                         f"object with field {g!r}.")
    k_td, m = _flat_cross(tests[test_key], None, n, kk, coupled, f"k_test_train ({g})", dtype,
                          device)
    mean = (k_td @ solve(key, y_vec)).reshape(m, *y_shape[1:])
    if priors is None:
        return Gaussian(mean, None)
    prior_key = "single" if "single" in priors else "nngp"
    if prior_key not in priors:
        raise ValueError("predict_fn: k_test_test must be a tensor or hold an 'nngp' kernel "
                         "(the prior covariance of the test outputs).")
    k_tt, _ = _flat_cross(priors[prior_key], m, n, kk, coupled, "k_test_test", dtype, device)
    if g == "nngp" or (is_single and "ntk" not in checked):
        if g == "ntk":
            raise ValueError(
                "predict_fn: the NTK covariance needs the NNGP too (prior covariance): pass "
                "k_train_train and k_test_train with fields 'nngp' and 'ntk', as "
                "analytic_ntk(..., get=('nngp', 'ntk')) returns.")
        cov = k_tt - k_td @ solve(key, k_td.mT)
        return Gaussian(mean, _unflat_cov(cov, m, kk, coupled))
    if "nngp" not in checked or "nngp" not in tests:
        raise ValueError(
            "predict_fn: the NTK covariance needs the NNGP too (prior covariance): pass "
            "k_train_train and k_test_train with fields 'nngp' and 'ntk', as "
            "analytic_ntk(..., get=('nngp', 'ntk')) returns.")
    nngp_td, _ = _flat_cross(tests["nngp"], None, n, kk, coupled, "k_test_train (nngp)", dtype,
                             device)
    term = solve("ntk", k_td.mT)  # Θ⁻¹ Θ_X*  (D, M)
    cross = k_td @ solve("ntk", nngp_td.mT)  # Θ_*X Θ⁻¹ K_X*
    cov = k_tt + term.mT @ checked["nngp"][0] @ term - cross - cross.mT
    return Gaussian(mean, _unflat_cov(cov, m, kk, coupled))


def _call_kernel_fn(kernel_fn: Callable, x1: Tensor, x2: Optional[Tensor],
                    gets: Sequence[str], name: str) -> dict[str, Tensor]:
    """``kernel_fn(x1, x2, get=...)`` as a dict of the kernels asked for."""
    res = kernel_fn(x1, x2, get=gets[0] if len(gets) == 1 else tuple(gets))
    found = _as_kernels(res, "kernel_fn's result", name)
    if "single" in found:
        if len(gets) != 1:
            raise ValueError(f"{name}: kernel_fn(x1, x2, get={tuple(gets)}) returned one tensor; "
                             "it must return a namedtuple (or dict) with those fields.")
        return {gets[0]: found["single"]}
    missing = [g for g in gets if g not in found]
    if missing:
        raise ValueError(f"{name}: kernel_fn(x1, x2, get={tuple(gets)}) did not return "
                         f"{missing}.")
    return {g: found[g] for g in gets}


def _ensemble_at(g: str, eig: tuple[Tensor, Tensor], t: Any, k_dd: dict, k_td: Optional[dict],
                 k_tt: Optional[Tensor], y: Tensor, learning_rate: float,
                 compute_cov: bool) -> Any:
    """gradient_descent_mse_ensemble's mean (or Gaussian) for kernel ``g`` at finite times."""
    evals, evecs = eig
    dtype, device = evecs.dtype, evecs.device
    coupled = k_dd[g].ndim == 4
    y_shape = tuple(y.shape)
    n = y_shape[0]
    kk = 1 if len(y_shape) == 1 else int(torch.Size(y_shape[1:]).numel())
    y2 = y.detach().to(dtype).reshape(n, kk)
    y_vec = y2.reshape(n * kk, 1) if coupled else y2
    times = _check_times(t, dtype, device) * float(learning_rate)
    t_shape = tuple(times.shape)
    times = times.reshape(-1, 1) / float(y.numel())  # (T, 1), the decay is exp(-λ · times)
    scaled = evals * times  # (T, D)
    positive = evals > 0
    safe = torch.where(positive, evals, torch.ones_like(evals))

    def gain(factor: float) -> Tensor:  # (1 - exp(-factor λ t)) / λ, limit factor · t at λ = 0
        return torch.where(positive, -torch.expm1(-factor * scaled) / safe,
                           (factor * times).expand_as(scaled))

    def in_basis(diag: Tensor) -> Tensor:  # V diag Vᵀ for each time: (T, D, D)
        return (evecs * diag.unsqueeze(-2)) @ evecs.mT

    proj = evecs.mT @ y_vec  # (D, K')
    if k_td is None:
        m = n
        mean = evecs @ (-torch.expm1(-scaled).unsqueeze(-1) * proj)
        mean = mean.reshape(*t_shape, *y_shape)
    else:
        ktd, m = _flat_cross(k_td[g], None, n, kk, coupled, f"kernel_fn(x_test, x_train).{g}",
                             dtype, device)
        mean = ktd @ (evecs @ (gain(1.0).unsqueeze(-1) * proj))
        mean = mean.reshape(*t_shape, m, *y_shape[1:])
    if not compute_cov:
        return mean
    if k_td is None:
        if g == "nngp":
            cov = in_basis(evals * torch.exp(-2.0 * scaled))
        else:
            decay = in_basis(torch.exp(-scaled))
            nngp_dd, _ = _flat_cross(k_dd["nngp"], n, n, kk, coupled, "nngp", dtype, device)
            cov = decay @ nngp_dd @ decay
    else:
        ktt, _ = _flat_cross(k_tt, m, n, kk, coupled, "kernel_fn(x_test, None).nngp", dtype,
                             device)
        if g == "nngp":
            cov = ktt - ktd @ in_basis(gain(2.0)) @ ktd.mT
        else:
            nngp_dd, _ = _flat_cross(k_dd["nngp"], n, n, kk, coupled, "nngp", dtype, device)
            nngp_td, _ = _flat_cross(k_td["nngp"], None, n, kk, coupled,
                                     "kernel_fn(x_test, x_train).nngp", dtype, device)
            a = ktd @ in_basis(gain(1.0))  # (T, M', D)
            cross = a @ nngp_td.mT
            cov = ktt + a @ nngp_dd @ a.mT - cross - cross.mT
    cov = _unflat_cov(cov, m, kk, coupled)
    return Gaussian(mean, cov.reshape(*t_shape, *cov.shape[1:]))
