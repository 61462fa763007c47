"""Elementwise activations φ: ``K' = E[φ(u) φ(v)]``, ``Θ' = Θ ⊙ E[φ'(u) φ'(v)]`` with (u, v)
Gaussian of covariance ``[[q, c], [c, q']]`` (c the pair's K, q and q' each input's own
variance at the two positions).

ReLU (arc-cosine kernels, https://arxiv.org/abs/1112.3712), leaky ReLU (a combination of ReLU
and the identity), erf (Williams 1997) and the identity have closed forms. Every other
activation uses the Hermite (Mehler) expansion of the bivariate normal: with ``σ² = q``,
``σ'² = q'`` and correlation ``ρ``,

    E[φ(u) φ(v)] = Σ_k a_k(σ) a_k(σ') ρ^k,   a_k(σ) = E[φ(σ z) He_k(z)] / sqrt(k!),  z ~ N(0, 1).

The coefficients are per-input (and per-position) 1-D integrals, computed once with an n-point
Gauss-Hermite rule, so a pair costs one polynomial in ρ. The series is summed exactly up to
``k = n // 2`` (fewer when the coefficients have decayed below rounding) and the remaining terms
are folded into ``ρ^{k_even}`` and ``ρ^{k_odd}`` with their exact weights at ``ρ = ±1``, so the
result is exact (to the 1-D rule) for parallel and anti-parallel inputs.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from torch_ntk.infinite.rules.base import Orientation, Pair, Rule, Shape

CLOSED_FORMS = ("relu", "leaky_relu", "erf", "identity")
# Correlations this close to ±1 are rounding noise of duplicated or opposite inputs.
_NEAR_ONE = {dt: 1 - 8 * torch.finfo(dt).eps for dt in (torch.float16, torch.bfloat16,
                                                          torch.float32, torch.float64)}
_CONSTANTS: dict = {}


def _constant(value: float, like: Tensor) -> Tensor:
    """A 0-dim tensor of ``value`` with ``like``'s dtype and device, made once."""
    key = (value, like.dtype, like.device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.full((), value, dtype=like.dtype, device=like.device)
    return _CONSTANTS[key]
DEFAULT_QUADRATURE_DEGREE = 256


class Activation(Rule):
    """Base of the two kinds: elementwise, so shapes and position layouts are kept."""

    name = "activation"
    uses_variance = True
    odd = False

    def shape(self, inputs: Sequence[Shape]) -> Shape:
        return inputs[0]

    def apply(self, inputs, orients, out, side1=None, side2=None) -> Pair:
        (x,) = inputs
        k, dot = self.pair(x.nngp, out, side1, side1 if out.aligned else side2,
                           need_dot=out.ntk and x.ntk is not None, owned=x.owned)
        if not out.ntk or x.ntk is None:
            return Pair(k, None)
        return Pair(k, x.ntk.mul_(dot) if x.owned else dot.mul_(x.ntk))

    def apply_dense(self, x: Pair, out: Orientation, side1, side2, w2: float, b2: float
                    ) -> Pair:
        """This activation, then a dense layer's ``w² K + b²``, ``w² Θ + K'`` (features only):
        the scaling is folded into the activation's last products, Θ' is one pass."""
        k, dot = self.pair(x.nngp, out, side1, side1 if out.aligned else side2,
                           need_dot=out.ntk and x.ntk is not None, owned=x.owned, scale=w2)
        if b2:
            k.add_(b2)
        if not out.ntk:
            return Pair(k, None)
        if x.ntk is None:
            return Pair(k, k.clone())
        t = torch.addcmul(k, x.ntk, dot, out=x.ntk) if x.owned else torch.addcmul(k, x.ntk, dot)
        return Pair(k, t)

    def pair(self, c: Tensor, orient: Orientation, side1, side2, *, need_dot: bool,
             owned: bool = False, scale: float = 1.0) -> Tuple[Tensor, Optional[Tensor]]:
        """(scale · E[φφ'], scale · E[φ'φ'] or None) of the pair covariances ``c``;
        ``owned``: c may be overwritten."""
        raise NotImplementedError


class ClosedForm(Activation):
    """relu, leaky_relu (``slope``), erf, identity."""

    def __init__(self, kind: str, slope: float = 0.0) -> None:
        self.kind, self.slope = kind, float(slope)
        self.name = kind
        self.odd = kind in ("erf", "identity") or (kind == "leaky_relu" and slope == 1.0)

    def prepare(self, variance: Tensor) -> Tuple[Tensor, Tensor]:
        """Each input's standard deviation per position and its inverse (0 for 0)."""
        sigma = variance.clamp_min(0).sqrt()
        return sigma, torch.where(sigma > 0, 1 / sigma, torch.zeros_like(sigma))

    def pair(self, c, orient, side1, side2, *, need_dot, owned=False, scale=1.0):
        if self.kind != "relu" and scale != 1.0:
            k, dot = self.pair(c, orient, side1, side2, need_dot=need_dot, owned=owned)
            return k.mul_(scale), (None if dot is None else dot.mul_(scale))
        s1, s2 = orient.left(side1[0]), orient.right(side2[0])
        if self.kind == "identity":
            return c.clone(), (torch.ones_like(c) if need_dot else None)
        if self.kind == "erf":
            # E[erf(u) erf(v)] = 2/π asin(2c / sqrt((1+2q)(1+2q'))),
            # E[erf'(u) erf'(v)] = 4/π / sqrt((1+2q)(1+2q') - 4c²)
            a = (1 + 2 * s1 * s1) * (1 + 2 * s2 * s2)
            dot = None
            if need_dot:
                dot = torch.mul(c, c).mul_(-4).add_(a).rsqrt_().mul_(4 / math.pi)
            k = torch.mul(c, 2 * a.rsqrt()).clamp_(-1.0, 1.0).asin_().mul_(2 / math.pi)
            return k, dot
        inv1, inv2 = orient.left(side1[1]), orient.right(side2[1])
        keep_c = self.kind == "leaky_relu" or not owned
        rho = (torch.mul(c, inv1) if keep_c else c.mul_(inv1)).mul_(inv2).clamp_(-1.0, 1.0)
        # Correlations within 8 ulps of ±1 (rounding noise for duplicated or opposite inputs)
        # become exactly ±1: E[φ'φ'] would turn that noise into O(sqrt(eps)) errors.
        near = _NEAR_ONE[rho.dtype]
        if rho.numel():
            lo, hi = torch.stack(torch.aminmax(rho)).tolist()
            if hi >= near or lo <= -near:
                rho.masked_fill_(rho >= near, 1.0).masked_fill_(rho <= -near, -1.0)
        # E[relu(u) relu(v)] = σσ'/(2π) (sin θ + (π - θ) cos θ), E[step step] = (π - θ)/(2π),
        # θ = acos ρ: π - θ = π/2 + asin ρ and sin θ = sqrt(1 - ρ²).
        pm = torch.asin(rho).add_(math.pi / 2)
        k = torch.addcmul(_constant(1.0, rho), rho, rho, value=-1.0).sqrt_()
        k.addcmul_(rho, pm).mul_(s1).mul_(s2 * (scale / (2 * math.pi)))
        dot = pm.mul_(scale / (2 * math.pi)) if need_dot else None
        if self.kind == "leaky_relu":
            # φ = α u + (1 - α) relu(u): E[φφ'] = α c + (1-α)² E[relu relu'],
            # E[φ'φ'] = α + (1-α)² E[step step']
            a = self.slope
            k.mul_((1 - a) ** 2).add_(c, alpha=a)
            if dot is not None:
                dot.mul_((1 - a) ** 2).add_(a)
        return k, dot


class Hermite(Activation):
    """Any elementwise φ through its Hermite expansion (derivative by autograd)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], label: str,
                 degree: int = DEFAULT_QUADRATURE_DEGREE, odd: bool = False) -> None:
        self.fn, self.label, self.n, self.kmax, self.odd = fn, label, degree, degree // 2, odd
        self.name = label

    def prepare(self, variance: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(σ, coefficients of φ(σ·), of φ'(σ·)), each (N, *S[, n])."""
        z, sqrt_w, basis = _hermite_rule(self.n)
        dev = variance.device
        z, sqrt_w = torch.as_tensor(z, device=dev), torch.as_tensor(sqrt_w, device=dev)
        basis_t = torch.as_tensor(basis.T.copy(), device=dev)      # (node, k)
        sigma = variance.clamp_min(0).sqrt()
        s = sigma.to(torch.float64).reshape(-1)
        with torch.enable_grad():
            pts = (s[:, None] * z[None, :]).requires_grad_(True)
            vals = self.fn(pts)
            if not isinstance(vals, Tensor) or vals.shape != pts.shape:
                got = tuple(vals.shape) if isinstance(vals, Tensor) else type(vals).__name__
                raise TypeError(f"analytic_ntk: the activation {self.label} must be elementwise "
                                f"(Tensor -> Tensor of the same shape); for input "
                                f"{tuple(pts.shape)} it returned {got}.")
            vals = vals.to(torch.float64)
            grads = None
            if vals.requires_grad:
                (grads,) = torch.autograd.grad(vals, pts, torch.ones_like(vals),
                                               allow_unused=True)
        grads = torch.zeros_like(pts) if grads is None else grads
        vals, grads = vals.detach(), grads.detach()
        if not (bool(torch.isfinite(vals).all()) and bool(torch.isfinite(grads).all())):
            raise ValueError(f"analytic_ntk: the activation {self.label} or its derivative is "
                             f"not finite at the quadrature nodes (pre-activation std up to "
                             f"{float(s.max()):.3g}); use an activation that grows at most "
                             f"polynomially, or smaller w_std/b_std/inputs.")
        shape = tuple(variance.shape) + (self.n,)
        coef = (vals * sqrt_w).mm(basis_t).reshape(shape).to(variance.dtype)
        coef_d = (grads * sqrt_w).mm(basis_t).reshape(shape).to(variance.dtype)
        return sigma, coef, coef_d

    def pair(self, c, orient, side1, side2, *, need_dot, owned=False, scale=1.0):
        (s1, a1, d1), (s2, a2, d2) = side1, side2
        v1, v2 = orient.left(s1), orient.right(s2)
        inv1 = torch.where(v1 > 0, 1 / v1, torch.zeros_like(v1))
        inv2 = torch.where(v2 > 0, 1 / v2, torch.zeros_like(v2))
        rho = torch.mul(c, inv1).mul_(inv2).clamp_(-1.0, 1.0)
        k = self._series(rho, a1, a2, orient)
        dot = self._series(rho, d1, d2, orient) if need_dot else None
        if scale != 1.0:
            k.mul_(scale)
            dot = None if dot is None else dot.mul_(scale)
        return k, dot

    def _series(self, rho: Tensor, a1: Tensor, a2: Tensor, orient: Orientation) -> Tensor:
        """Σ_k a1[.., k] a2[.., k] ρ^k with the tail beyond the cut folded at ρ = ±1."""
        kmax, eps = self.kmax, torch.finfo(rho.dtype).eps
        # Cut where the remaining terms up to kmax cannot add up to more than rounding.
        flat1, flat2 = a1.reshape(-1, self.n), a2.reshape(-1, self.n)
        bound = flat1.abs().amax(0) * flat2.abs().amax(0)
        scale = float(torch.sqrt((flat1 * flat1).sum(1).max() * (flat2 * flat2).sum(1).max()))
        tail = torch.flip(torch.cumsum(torch.flip(bound[1:kmax + 1], (0,)), 0), (0,))
        above = torch.nonzero(tail > eps * scale)
        cut = int(above[-1]) + 1 if above.numel() else 0
        acc = torch.mul(orient.left(a1[..., cut]), orient.right(a2[..., cut])).expand_as(rho)
        acc = acc.contiguous()
        for k in range(cut - 1, -1, -1):
            acc.mul_(rho).addcmul_(orient.left(a1[..., k]), orient.right(a2[..., k]))
        for start in (cut + 1, cut + 2):
            if start < self.n:
                weight = orient.dot(a1[..., start::2], a2[..., start::2])
                acc.addcmul_(weight, torch.pow(rho, start))
        return acc


@functools.lru_cache(maxsize=8)
def _hermite_rule(n: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gauss-Hermite rule for N(0, 1) by Golub-Welsch: nodes, sqrt(weights), and the
    orthonormal matrix ``basis[k, i] = He_k(z_i) / sqrt(k!) · sqrt(w_i)``."""
    off = np.sqrt(np.arange(1, n, dtype=np.float64))
    z, vecs = np.linalg.eigh(np.diag(off, 1) + np.diag(off, -1))
    vecs = vecs * np.sign(vecs[0])  # first row is sqrt(w_i) > 0
    z = (z - z[::-1]) / 2  # exact symmetry of the nodes
    return z, np.abs(vecs[0]), vecs
