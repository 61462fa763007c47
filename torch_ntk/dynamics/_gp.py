"""Gaussian-process predictions: the ``Gaussian`` namedtuple, ``gp_inference`` (NNGP posterior
and NTK ensemble at ``t = ∞``) and ``gradient_descent_mse_ensemble`` (the infinite ensemble's
mean and covariance at any time), with their helpers for Cholesky solves, test kernels,
posterior and finite-time ensemble moments. Public through ``torch_ntk.dynamics.predict``.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from torch_ntk.dynamics._checks import (_add_diagonal_regularizer, _as_kernels, _canonical_get,
                                        _check_diag_reg, _check_learning_rate,
                                        _check_operator_targets, _check_times, _check_train,
                                        _Scalar)
from torch_ntk.dynamics._iterative import OperatorSystem, is_operator


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


def gp_inference(k_train_train: Any, y_train: Tensor, diag_reg: float = 0.0, *,
                 diag_reg_absolute_scale: bool = False, rtol: float = 1e-6,
                 maxiter: Optional[int] = None,
                 preconditioner_rank: int = 1024) -> Callable[..., Any]:
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
        rtol, maxiter, preconditioner_rank: for a ``torch_ntk.NTKOperator`` as the one
            training kernel (never formed), the conjugate-gradient solves as in
            ``gradient_descent_mse``; ``predict_fn.last`` tells what the last solve reached.

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
    if is_operator(k_train_train):
        return _operator_inference(k_train_train, y_train, diag_reg, diag_reg_absolute_scale,
                                   rtol, maxiter, preconditioner_rank)
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

    return _inference_fn(trains, checked, regs, solve, y_vec, y_shape, n, kk, coupled, dtype)


def _inference_fn(trains: dict, checked: dict, regs: dict, solve: Callable, y_vec: Tensor,
                  y_shape: tuple, n: int, kk: int, coupled: bool, dtype: torch.dtype,
                  last: Callable[[], Any] = lambda: None) -> Callable[..., Any]:
    """``predict_fn`` of ``gp_inference`` over checked training kernels and their ``solve``;
    ``last()`` is what the last solve reached (``predict_fn.last``)."""

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
        predict_fn.last = last()
        if single:
            return out[gets[0]]
        return collections.namedtuple("Gaussians", gets)(**out)

    predict_fn.last = None
    return predict_fn


def _operator_inference(op, y_train: Tensor, diag_reg: float, absolute: bool, rtol: float,
                        maxiter: Optional[int], rank: int) -> Callable[..., Any]:
    """``gp_inference`` with one kernel given as an operator: the GP posterior of that kernel,
    every solve by conjugate gradients."""
    name = "gp_inference"
    y_shape = _check_operator_targets(op, y_train, diag_reg, name)
    system = OperatorSystem(op, y_shape, float(diag_reg), absolute, rtol=rtol,
                            maxiter=maxiter, rank=rank, name=name)
    n, kk, coupled, dtype = system.n, system.kk, system.coupled, system.dtype
    y2 = y_train.detach().to(system.device, dtype).reshape(n, kk)
    y_vec = y2.reshape(n * kk, 1) if coupled else y2
    return _inference_fn({"single": op}, {"single": (None, y_shape, coupled)},
                         {"single": system}, lambda _, rhs: system.solve(rhs), y_vec, y_shape,
                         n, kk, coupled, dtype, last=lambda: system.last)


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
