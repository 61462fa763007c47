"""Kernels given as operators (``torch_ntk.NTKOperator``): the solves of ``gradient_descent_mse``
and ``gp_inference`` by preconditioned conjugate gradients (``t = ∞``) and the matrix functions
of finite times by Lanczos, never forming the kernel.

The regularised kernel is ``A = Θ + reg·I``. ``pcg`` solves ``A X = B`` column by column,
preconditioned by a low-rank ``Θ ≈ U Λ Uᵀ`` (``P⁻¹ = (λ_r + reg) U (Λ + reg)⁻¹ Uᵀ + I − U Uᵀ``,
as in Frangella, Tropp and Udell 2023), which leaves CG the condition number of the rest of the
spectrum. For an ``NTKOperator`` the low-rank part comes from its random features (one pass over
the data, about the cost of one product); for other operators from a randomized Nyström
approximation (``A Ω`` for ``rank`` Gaussian columns). ``lanczos`` gives ``f(A) b`` as
``‖b‖ Q f(T) e₁`` from the Krylov basis Q (fully reorthogonalised) and tridiagonal T.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

_log = logging.getLogger("torch_ntk")
_RESTARTS = 3   # CG runs restarted from the true residual when the recurrence's drifted


@dataclass
class Solve:
    """What an iterative solve reached: ``method`` ("cg" or "lanczos"), ``iterations`` (the
    most any column took), ``residual`` (the largest relative residual ``‖b − A x‖ / ‖b‖`` for
    CG, the Lanczos error estimate relative to the result's norm), ``matvecs`` (columns
    multiplied by the kernel, the preconditioner's included)."""

    method: str
    iterations: int
    residual: float
    matvecs: int


def is_operator(k) -> bool:
    """A kernel given as an operator: ``shape``, ``dtype``, ``matmul`` and ``diagonal``."""
    return not isinstance(k, Tensor) and all(
        hasattr(k, name) for name in ("shape", "dtype", "matmul", "diagonal"))


class OperatorSystem:
    """The regularised kernel operator of ``gradient_descent_mse``/``gp_inference``.

    Args:
        op: an NTKOperator (``mode="trace"``: shared by the K output columns; ``"full"``:
            coupled, rows ``n·K + a``).
        y_shape (tuple): the targets' shape.
        diag_reg (float), absolute (bool): the ridge, as for tensors.
        rtol (float): relative residual CG and Lanczos stop at.
        maxiter (int, optional): iterations allowed (default: 10 times the operator's size).
        rank (int): the preconditioner's rank (0: none): the width of the random features
            of an NTKOperator, or of a Nyström approximation for other operators.
        name (str): the caller, for errors.
    """

    def __init__(self, op, y_shape: tuple, diag_reg: float, absolute: bool, *, rtol: float,
                 maxiter: int | None, rank: int, name: str) -> None:
        n = y_shape[0]
        kk = 1 if len(y_shape) == 1 else math.prod(y_shape[1:])
        self.coupled = getattr(op, "mode", "trace") == "full"
        size = n * kk if self.coupled else n
        if tuple(op.shape) != (size, size):
            want = f"(N·K, N·K) = ({size}, {size})" if self.coupled else f"(N, N) = ({n}, {n})"
            raise ValueError(f"{name}: the kernel operator must have shape {want} to match "
                             f"y_train of shape {tuple(y_shape)}, got {tuple(op.shape)}.")
        if not (isinstance(rtol, float) and 0 < rtol < 1):
            raise ValueError(f"{name}: rtol must be a float in (0, 1), got {rtol!r}.")
        self.op, self.n, self.kk, self.name = op, n, kk, name
        self.dtype, self.device = op.dtype, op.device
        self.rtol, self.maxiter, self.rank = rtol, maxiter or 10 * size, min(rank, size)
        self.reg = 0.0
        if diag_reg:
            self.reg = float(diag_reg) if absolute else float(diag_reg) * float(
                op.diagonal().double().mean())
        self.last: Solve | None = None
        self._nystrom: tuple[Tensor, Tensor] | None = None
        self._matvecs = 0

    def apply(self, v: Tensor) -> Tensor:
        """``(Θ + reg) v`` for v Tensor[size, r]."""
        self._matvecs += v.shape[1]
        out = self.op.matmul(v)
        return out + self.reg * v if self.reg else out

    def to_vec(self, f: Tensor) -> Tensor:
        """(..., N, K) -> the operator's layout: (..., N·K, 1) coupled, else as it is."""
        return f.reshape(*f.shape[:-2], self.n * self.kk, 1) if self.coupled else f

    def from_vec(self, f: Tensor) -> Tensor:
        return f.reshape(*f.shape[:-2], self.n, self.kk) if self.coupled else f

    def solve(self, b: Tensor) -> Tensor:
        """``A⁻¹ b`` for b Tensor[size, r] by preconditioned CG; records ``last``."""
        self._matvecs = 0
        precondition = self._preconditioner()
        x, iterations = torch.zeros_like(b), 0
        norms = b.norm(dim=0).clamp_min(1e-300)
        r, runs = b, 0
        while True:   # restarted from the true residual, which rounding in the recurrences
            residual = float((r.norm(dim=0) / norms).max()) if r.numel() else 0.0   # can leave
            if residual <= self.rtol or iterations >= self.maxiter or runs > _RESTARTS:
                break
            dx, steps = pcg(self.apply, r, precondition, self.rtol * 0.5,
                            self.maxiter - iterations, scale=norms)
            x, iterations, runs = x + dx, iterations + steps, runs + 1
            r = b - self.apply(x)
        self._record(Solve("cg", iterations, residual, self._matvecs))
        if residual > self.rtol * 10:
            raise ValueError(
                f"predict_fn: conjugate gradients reached a relative residual of {residual:.2e} "
                f"after {iterations} iterations, short of rtol={self.rtol:g}: the regularised "
                f"kernel is (close to) singular. Pass {self.name} a larger diag_reg, or a larger "
                "maxiter.")
        return x

    def functions(self, b: Tensor, fns: Callable[[Tensor], Tensor]) -> Tensor:
        """``f(A) b`` for every function ``fns`` gives: b Tensor[size, r], ``fns(λ)``
        Tensor[F, m] for eigenvalues λ Tensor[m]; result Tensor[F, size, r]."""
        self._matvecs = 0
        out, iterations, error = lanczos(self.apply, b, lambda lam: fns(lam.clamp_min(0)),
                                         self.rtol, self.maxiter)
        self._record(Solve("lanczos", iterations, error, self._matvecs))
        return out

    def _record(self, solve: Solve) -> None:
        self.last = solve
        _log.info("%s: %s, %d iterations, relative residual %.2e, %d kernel-vector products",
                  self.name, solve.method, solve.iterations, solve.residual, solve.matvecs)

    def _preconditioner(self) -> Callable[[Tensor], Tensor] | None:
        if self.rank <= 0:
            return None
        if self._nystrom is None:
            if hasattr(self.op, "features"):   # Θ ≈ F Fᵀ from the random features, by SVD
                width = max(1, self.rank // (1 if self.coupled else self.op.k))
                f = self.op.features(width).reshape(self.op.shape[0], -1).double()
                u, s, _ = torch.linalg.svd(f, full_matrices=False)
                self._nystrom = (u.to(self.dtype), (s * s).to(self.dtype))
            else:
                self._nystrom = nystrom(lambda v: self.op.matmul(v), self.op.shape[0],
                                        self.rank, self.dtype, self.device)
                self._matvecs += self.rank
        u, lam = self._nystrom
        mu = self.reg
        if mu <= 0:
            return None if not lam.numel() else _projected(u, lam, float(lam[-1]) * 1e-3)
        return _projected(u, lam, mu)


def pcg(apply: Callable[[Tensor], Tensor], b: Tensor, precondition, rtol: float,
        maxiter: int, scale: Tensor | None = None) -> tuple[Tensor, int]:
    """Solves ``A X = B`` (columns independently) for symmetric positive definite A, until
    ``‖r‖ <= rtol · scale`` per column (``scale``: ``‖b‖`` by default).

    Returns:
        (X Tensor[size, r], iterations the slowest column took).
    """
    x = torch.zeros_like(b)
    r = b.clone()
    norms = (b.norm(dim=0) if scale is None else scale).clamp_min(torch.finfo(b.dtype).tiny)
    z = precondition(r) if precondition else r
    p = z.clone()
    rz = (r * z).sum(0)
    active = (r.norm(dim=0) / norms) > rtol
    iterations = 0
    while bool(active.any()) and iterations < maxiter:
        iterations += 1
        cols = active.nonzero().flatten()
        ap = apply(p[:, cols])
        alpha = rz[cols] / (p[:, cols] * ap).sum(0)
        x[:, cols] += alpha * p[:, cols]
        r[:, cols] -= alpha * ap
        z_new = precondition(r[:, cols]) if precondition else r[:, cols]
        rz_new = (r[:, cols] * z_new).sum(0)
        p[:, cols] = z_new + (rz_new / rz[cols]) * p[:, cols]
        rz[cols] = rz_new
        active[cols] = (r[:, cols].norm(dim=0) / norms[cols]) > rtol
    return x, iterations


def lanczos(apply: Callable[[Tensor], Tensor], b: Tensor, fns, rtol: float,
            maxiter: int) -> tuple[Tensor, int, float]:
    """``f(A) b`` per column of b (Tensor[size, r]) from a fully reorthogonalised Lanczos
    basis; stops when one more step changes no result by more than ``rtol`` of its norm.

    Returns:
        (Tensor[F, size, r], iterations, the last step's change relative to the result).
    """
    size, r = b.shape
    beta0 = b.norm(dim=0)
    q = b / beta0.clamp_min(torch.finfo(b.dtype).tiny)
    basis = [q]
    alphas, betas = [], []
    previous, change, out = None, float("inf"), None
    steps = min(maxiter, size)
    for step in range(steps):
        w = apply(basis[-1])
        alpha = (w * basis[-1]).sum(0)
        stacked = torch.stack(basis)                           # (m, size, r)
        for _ in range(2):   # full reorthogonalisation, twice is enough
            w = w - torch.einsum("msr,sr->mr", stacked, w).unsqueeze(1).mul(stacked).sum(0)
        alphas.append(alpha)
        beta = w.norm(dim=0)
        out = _krylov_result(stacked, alphas, betas, beta0, fns)       # (F, size, r)
        if previous is not None:
            scale = out.norm(dim=1).clamp_min(torch.finfo(b.dtype).tiny)
            change = float(((out - previous).norm(dim=1) / scale).max())
            if change <= rtol:
                return out, step + 1, change
        previous = out
        if bool((beta <= torch.finfo(b.dtype).eps * beta0.clamp_min(1e-300)).all()):
            return out, step + 1, 0.0   # an invariant subspace: exact
        betas.append(beta)
        basis.append(w / beta.clamp_min(torch.finfo(b.dtype).tiny))
    return out, steps, change


def nystrom(apply: Callable[[Tensor], Tensor], size: int, rank: int, dtype: torch.dtype,
            device: torch.device) -> tuple[Tensor, Tensor]:
    """Randomized Nyström approximation ``Θ ≈ U diag(λ) Uᵀ`` from ``Θ Ω`` (stable form with a
    shift ν): U Tensor[size, rank] orthonormal, λ Tensor[rank] descending, >= 0."""
    gen = torch.Generator(device=device).manual_seed(0)
    omega, _ = torch.linalg.qr(torch.randn(size, rank, generator=gen, dtype=dtype,
                                           device=device))
    y = apply(omega)
    nu = math.sqrt(size) * torch.finfo(dtype).eps * float(y.norm())
    y = y + nu * omega
    small = omega.mT @ y
    chol = torch.linalg.cholesky(0.5 * (small + small.mT))
    factor = torch.linalg.solve_triangular(chol, y.mT, upper=False).mT   # y C⁻ᵀ
    u, s, _ = torch.linalg.svd(factor, full_matrices=False)
    return u, (s * s - nu).clamp_min(0.0)


# Internal helpers

def _projected(u: Tensor, lam: Tensor, mu: float) -> Callable[[Tensor], Tensor]:
    """``P⁻¹ v = (λ_r + μ) U (Λ + μ)⁻¹ Uᵀ v + v − U Uᵀ v``."""
    scale = (float(lam[-1]) + mu) / (lam + mu)

    def apply(v: Tensor) -> Tensor:
        coeff = u.mT @ v
        return v + u @ ((scale[:, None] - 1.0) * coeff)

    return apply


def _krylov_result(basis: Tensor, alphas: list, betas: list, beta0: Tensor, fns) -> Tensor:
    """``‖b‖ Q f(T) e₁`` per column from the Lanczos coefficients so far."""
    m, size, r = basis.shape
    t = torch.diag_embed(torch.stack(alphas, dim=-1))                  # (r, m, m)
    if betas:
        off = torch.stack(betas, dim=-1)                                # (r, m - 1)
        t = t + torch.diag_embed(off, offset=1) + torch.diag_embed(off, offset=-1)
    evals, evecs = torch.linalg.eigh(t)                                 # (r, m), (r, m, m)
    values = torch.stack([fns(evals[c]) for c in range(r)], dim=1)     # (F, r, m)
    coeff = torch.einsum("rim,frm->fri", evecs, values * evecs[:, 0, :].unsqueeze(0))
    return torch.einsum("msr,frm->fsr", basis, coeff) * beta0
