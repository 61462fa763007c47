"""Infinite-width NNGP and NTK of fully-connected networks (Jacot et al. 2018).

The network has ``depth`` affine layers in the NTK parameterisation
``z_l = w_std / sqrt(n_{l-1}) · W_l h_{l-1} + b_std · b_l`` with ``W_l, b_l ~ N(0, 1)`` and
``h_l = φ(z_l)`` after every layer but the last. As the widths grow, the output covariance
``Σ_L`` (NNGP) and the NTK ``Θ_L`` become deterministic (https://arxiv.org/abs/1806.07572)::

    Σ_1 = w_std² · x·x' / n0 + b_std²,            Θ_1 = Σ_1,
    Σ_l = w_std² · E[φ(u) φ(v)] + b_std²,         Σ̇_l = w_std² · E[φ'(u) φ'(v)],
    Θ_l = Θ_{l-1} · Σ̇_l + Σ_l,

with ``(u, v) ~ N(0, [[Σ_{l-1}(x, x), Σ_{l-1}(x, x')], [Σ_{l-1}(x, x'), Σ_{l-1}(x', x')]])``.

ReLU (arc-cosine kernels, https://arxiv.org/abs/1112.3712), erf (Williams 1997) and the identity
have closed forms. Every other activation uses the Hermite (Mehler) expansion of the bivariate
normal: with ``σ² = Σ(x, x)``, ``σ'² = Σ(x', x')`` and correlation ``ρ``,

    E[φ(u) φ(v)] = Σ_k a_k(σ) a_k(σ') ρ^k,   a_k(σ) = E[φ(σ z) He_k(z)] / sqrt(k!),  z ~ N(0, 1).

The coefficients are per-input 1-D integrals, computed once with an n-point Gauss-Hermite rule
(``quadrature_degree = n``), so the per-pair cost is one polynomial in ρ rather than a 2-D
quadrature. The series is summed exactly up to ``k = n // 2`` (fewer when the coefficients have
already decayed below rounding) and the remaining terms are folded into ``ρ^{k_even}`` and
``ρ^{k_odd}`` with their exact weights at ``ρ = ±1``, so the result is exact (to the 1-D rule) for
parallel and anti-parallel inputs and the truncation error elsewhere is a fraction of the tail.
"""
from __future__ import annotations

import collections
import concurrent.futures
import functools
import math
import numbers
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ActivationLike = Union[str, Callable[[Tensor], Tensor]]


def _identity(x: Tensor) -> Tensor:
    return x


# The one table of named activations, shared by analytic_ntk and NTKMLP.
ACTIVATIONS: dict = {
    "relu": torch.relu,
    "erf": torch.erf,
    "identity": _identity,
    "tanh": torch.tanh,
    "gelu": F.gelu,  # exact (erf-based)
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
}
CLOSED_FORMS = ("relu", "erf", "identity")
GETS = ("nngp", "ntk")
DEFAULT_QUADRATURE_DEGREE = 256
# On CPU, tiles of fewer than 32768 entries (ATen's grain size) keep every elementwise op on the
# calling thread, so tiles run in parallel on a thread pool, one op stream per core. Large
# single-op parallel regions synchronise threads on every op, which stalls on a busy machine.
_CPU_TILE = 181
_CUDA_TILE = 4096
_GRAIN = 32768


def analytic_ntk(x1: Tensor, x2: Optional[Tensor] = None, *, depth: int,
                 activation: ActivationLike = "relu", w_std: float = 1.0, b_std: float = 0.0,
                 get: Union[str, Sequence[str]] = "ntk",
                 quadrature_degree: int = DEFAULT_QUADRATURE_DEGREE,
                 batch_size: Optional[int] = None) -> Union[Tensor, NamedTuple]:
    """Infinite-width NTK Θ∞ (or NNGP Σ_L) of a fully-connected network with ``depth`` layers.

    The network is the one built by ``NTKMLP(n0, width, depth, activation=..., w_std=...,
    b_std=...)``: ``empirical_ntk(model, x, mode="trace") / out_features`` converges to this
    kernel as ``width`` grows. Values match neural-tangents'
    ``stax.serial(Dense(n, w_std, b_std), act, ..., Dense(k, w_std, b_std))``.

    Args:
        x1 (Tensor[N1, n0]): first batch of inputs (floating point, finite).
        x2 (Tensor[N2, n0], optional): second batch; ``None`` means ``x1`` and computes only
            half of the (symmetric) kernel.
        depth (int): number of affine layers L ≥ 1; ``depth=1`` is a linear model.
        activation (str or callable): ``"relu"``, ``"erf"``, ``"identity"`` (closed forms);
            ``"tanh"``, ``"gelu"`` (exact, erf-based), ``"sigmoid"``, ``"softplus"`` or any
            elementwise callable ``Tensor -> Tensor`` (Hermite expansion; the derivative comes
            from autograd).
        w_std (float): weight standard deviation multiplier (≥ 0).
        b_std (float): bias standard deviation (≥ 0); 0 means no bias contribution.
        get (str or sequence of str): ``"ntk"`` -> Θ_L, ``"nngp"`` -> Σ_L; a tuple such as
            ``("nngp", "ntk")`` returns a namedtuple with those fields, in that order.
        quadrature_degree (int): number n of Gauss-Hermite nodes of the 1-D rule used for the
            Hermite coefficients (non-closed-form activations only); the series is summed to
            at most ``n // 2`` terms, so a pair costs ``O(n)`` per layer. At the default 256,
            tanh at depth 3 is accurate to ~1e-15 relative with unit-variance inputs, ~1e-10
            with ``w_std=1.5`` and ~5e-8 with ``w_std=2``; raise it when pre-activation standard
            deviations exceed about 2 (the integrand then varies on a scale ``1/σ`` that needs
            more nodes). Activations with a kink (relu as a callable) converge like ``1/n``.
        batch_size (int, optional): tile side; at most ``batch_size`` inputs of each side are
            processed at once (memory ``O(batch_size²)`` besides the output). Default: 181 on
            CPU, tiles processed in parallel by ``torch.get_num_threads()`` threads; 4096 on
            other devices.
    Returns:
        Tensor[N1, N2]: the kernel asked for by ``get``, or a namedtuple of them; dtype and
        device of ``x1`` (float16/bfloat16 inputs are computed in float32 and cast back).
    Raises:
        TypeError: inputs that are not floating-point tensors, an activation that is neither a
            known name nor a callable, a callable that is not elementwise, options of the wrong
            type (e.g. a float ``depth``).
        ValueError: ``depth < 1``, unknown activation name or ``get``, mismatched feature sizes,
            inputs on different devices or with different dtypes, non-finite inputs, negative or
            non-finite ``w_std``/``b_std``, bad ``quadrature_degree``/``batch_size``.
    Example:
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> torch_ntk.analytic_ntk(x, depth=3, activation="relu").shape
        torch.Size([5, 5])
        >>> k = torch_ntk.analytic_ntk(x, x[:2], depth=2, activation="tanh", get=("nngp", "ntk"))
        >>> k.nngp.shape, k.ntk.shape
        (torch.Size([5, 2]), torch.Size([5, 2]))
    """
    fields = _check_get(get)
    name, fn = resolve_activation(activation, caller="analytic_ntk")
    _check_options(depth, w_std, b_std, quadrature_degree, batch_size)
    symmetric = x2 is None
    x1, x2 = _check_inputs(x1, x2)
    out_dtype = x1.dtype
    work_dtype = x1.dtype if x1.dtype in (torch.float32, torch.float64) else torch.float32
    x1, x2 = x1.to(work_dtype), x2.to(work_dtype)
    w2, b2 = float(w_std) ** 2, float(b_std) ** 2
    if name in CLOSED_FORMS:
        act = _ClosedForm(name, w2, b2, work_dtype, x1.device)
    else:
        act = _Hermite(fn, quadrature_degree, w2, b2, work_dtype, x1.device)
    tile, workers = _tiling(batch_size, x1.device)
    with torch.no_grad():
        side1 = _per_input(act, x1, depth, w2, b2)
        side2 = side1 if symmetric else _per_input(act, x2, depth, w2, b2)
    n1, n2 = x1.shape[0], x2.shape[0]
    outs = {f: torch.empty(n1, n2, dtype=out_dtype, device=x1.device) for f in fields}

    def work(job: Tuple[int, int]) -> None:
        r0, c0 = job
        r1, c1 = min(r0 + tile, n1), min(c0 + tile, n2)
        views = {f: o[r0:r1, c0:c1] for f, o in outs.items()}
        with torch.no_grad():  # grad mode is per thread
            _tile(act, x1[r0:r1], x2[c0:c1], side1, side2, (r0, r1), (c0, c1), depth, w2, b2,
                  views, diagonal=symmetric and r0 == c0)
            for f, o in outs.items():
                if symmetric and c0 != r0:
                    o[c0:c1, r0:r1] = views[f].T
                elif symmetric:  # exact symmetry within the diagonal tile
                    views[f].copy_(views[f].triu() + views[f].triu(1).T)

    jobs = [(r0, c0) for r0 in range(0, n1, tile)
            for c0 in range(r0 if symmetric else 0, n2, tile)]
    if workers > 1 and len(jobs) > 1:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(work, jobs):
                pass
    else:
        for job in jobs:
            work(job)
    if len(fields) == 1 and isinstance(get, str):
        return outs[fields[0]]
    return _kernels_type(fields)(*(outs[f] for f in fields))


def resolve_activation(activation: ActivationLike, *, caller: str = "analytic_ntk"
                       ) -> Tuple[Optional[str], Callable[[Tensor], Tensor]]:
    """Maps an activation name or callable to ``(name or None, elementwise function)``.

    This is the single table of activations shared by ``analytic_ntk`` and ``NTKMLP``.

    Args:
        activation (str or callable): a key of ``ACTIVATIONS`` or an elementwise callable.
        caller (str): prefix of error messages.
    Returns:
        tuple: the name (``None`` for a callable) and the function.
    Raises:
        ValueError: unknown name. TypeError: neither a string nor a callable.
    """
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"{caller}: unknown activation {activation!r}; expected one of "
                f"{tuple(ACTIVATIONS)} or an elementwise callable such as "
                f"torch.nn.functional.silu.")
        return activation, ACTIVATIONS[activation]
    if callable(activation):
        _check_elementwise(activation, caller)
        return None, activation
    raise TypeError(f"{caller}: activation must be a name in {tuple(ACTIVATIONS)} or a callable "
                    f"Tensor -> Tensor, got {type(activation).__name__}.")


# Internal helpers

def _check_elementwise(fn: Callable[[Tensor], Tensor], caller: str) -> None:
    """Raises unless ``fn`` maps each entry on its own (softmax, cumsum, ... don't)."""
    z = torch.linspace(-2.0, 2.0, 7, dtype=torch.float64).reshape(1, 7)
    try:
        whole = fn(z)
        alone = [fn(z[:, i:i + 1]) for i in range(z.shape[1])]
    except Exception as exc:  # the user's callable: any failure is reported as such
        raise TypeError(f"{caller}: the activation callable failed on a float64 tensor of "
                        f"shape (1, 7): {type(exc).__name__}: {exc}") from exc
    if not (isinstance(whole, Tensor) and whole.shape == z.shape
            and all(isinstance(a, Tensor) and a.shape == (1, 1) for a in alone)):
        raise TypeError(f"{caller}: the activation must act elementwise and keep the shape "
                        f"(Tensor -> Tensor of the same shape); on shape (1, 7) it returned "
                        f"{getattr(whole, 'shape', type(whole).__name__)}.")
    if not torch.allclose(whole, torch.cat(alone, dim=1), rtol=1e-10, atol=1e-12):
        raise ValueError(
            f"{caller}: the activation must act elementwise (each output entry a function of "
            "the same input entry alone, shape kept), like torch.tanh or "
            "torch.nn.functional.silu; got a callable that mixes entries (e.g. softmax or "
            "cumsum).")


def _check_get(get) -> Tuple[str, ...]:
    fields = (get,) if isinstance(get, str) else get
    try:
        fields = tuple(fields)
    except TypeError:
        fields = None
    if (not fields or any(not isinstance(f, str) or f not in GETS for f in fields)
            or len(set(fields)) != len(fields)):
        raise ValueError(f"analytic_ntk: get must be one of {GETS} or a tuple of distinct names "
                         f"from it such as ('nngp', 'ntk'), got {get!r}.")
    return fields


def _check_options(depth, w_std, b_std, quadrature_degree, batch_size) -> None:
    _check_int("analytic_ntk", "depth", depth, 1,
               "the number of affine layers; 1 is a linear model")
    _check_std("analytic_ntk", "w_std", w_std)
    _check_std("analytic_ntk", "b_std", b_std)
    _check_int("analytic_ntk", "quadrature_degree", quadrature_degree, 4,
               "Gauss-Hermite nodes, e.g. 256")
    if quadrature_degree > 4096:
        raise ValueError(f"analytic_ntk: quadrature_degree must be at most 4096, "
                         f"got {quadrature_degree}.")
    if batch_size is not None:
        _check_int("analytic_ntk", "batch_size", batch_size, 1, "or None for the default")


def _check_int(caller: str, arg: str, val, low: int, hint: str) -> None:
    if isinstance(val, bool) or not isinstance(val, numbers.Integral):
        raise TypeError(f"{caller}: {arg} must be an int ({hint}), got {type(val).__name__}.")
    if val < low:
        raise ValueError(f"{caller}: {arg} must be an int ≥ {low} ({hint}), got {val!r}.")


def _check_std(caller: str, arg: str, val) -> None:
    if isinstance(val, bool) or not isinstance(val, numbers.Real):
        raise TypeError(f"{caller}: {arg} must be a float, got {type(val).__name__}.")
    if not math.isfinite(val) or val < 0:
        raise ValueError(f"{caller}: {arg} must be a finite float ≥ 0, got {val!r}.")


def _check_inputs(x1, x2) -> Tuple[Tensor, Tensor]:
    for arg, x in (("x1", x1), ("x2", x2)):
        if x is None:
            continue
        if not isinstance(x, Tensor):
            raise TypeError(f"analytic_ntk: {arg} must be a torch.Tensor, "
                            f"got {type(x).__name__}.")
        if not x.is_floating_point():
            raise TypeError(f"analytic_ntk: {arg} must be a floating-point tensor, got {x.dtype}; "
                            f"convert with {arg}.double() (float64 is recommended).")
        if x.dim() != 2:
            raise ValueError(f"analytic_ntk: {arg} must have shape (N, n0), got "
                             f"{tuple(x.shape)}; flatten the sample dimensions with "
                             f"{arg}.flatten(1).")
        if x.shape[1] == 0:
            raise ValueError(f"analytic_ntk: {arg} has no features (shape {tuple(x.shape)}).")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"analytic_ntk: {arg} contains NaN or infinite values.")
    if x2 is None:
        return x1, x1
    if x1.shape[1] != x2.shape[1]:
        raise ValueError(f"analytic_ntk: x1 and x2 must have the same number of features; got "
                         f"x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)}. Pass x2=None for the "
                         f"kernel of x1 with itself.")
    if x1.device != x2.device:
        raise ValueError(f"analytic_ntk: x1 is on {x1.device} but x2 is on {x2.device}; "
                         f"move both to the same device.")
    if x1.dtype != x2.dtype:
        raise ValueError(f"analytic_ntk: x1 is {x1.dtype} but x2 is {x2.dtype}; "
                         f"convert both to the same dtype.")
    return x1, x2


def _tiling(batch_size: Optional[int], device: torch.device) -> Tuple[int, int]:
    """(tile side, worker threads) for this device."""
    if device.type != "cpu":
        return batch_size or _CUDA_TILE, 1
    tile = batch_size or _CPU_TILE
    threads = torch.get_num_threads()
    return tile, (threads if tile * tile < _GRAIN else 1)


@functools.lru_cache(maxsize=None)
def _kernels_type(fields: Tuple[str, ...]):
    return collections.namedtuple("Kernels", fields)


def _per_input(act, x: Tensor, depth: int, w2: float, b2: float) -> list:
    """Per-input data for layers 2..L: [(σ, inverse σ, activation data)] for each."""
    q = w2 * (x * x).sum(1) / x.shape[1] + b2
    data = []
    for _ in range(depth - 1):
        sigma = q.clamp_min(0).sqrt()
        inv = torch.where(sigma > 0, 1 / sigma, torch.zeros_like(sigma))
        extra, q = act.prepare(q, sigma)
        data.append((sigma, inv, extra))
    return data


def _tile(act, x1: Tensor, x2: Tensor, side1: list, side2: list, rows: Tuple[int, int],
          cols: Tuple[int, int], depth: int, w2: float, b2: float, views: dict, *,
          diagonal: bool) -> None:
    """Writes the kernels of one tile into ``views`` (field -> Tensor[R, C] slice of the output);
    ``diagonal`` marks a tile whose diagonal pairs each input with itself."""
    c = torch.mm(x1, x2.T)
    c.mul_(w2 / x1.shape[1]).add_(b2)
    t = c.clone() if "ntk" in views and depth > 1 else None
    (r0, r1), (c0, c1) = rows, cols
    for layer in range(depth - 1):
        s1, i1, e1 = side1[layer]
        s2, i2, e2 = side2[layer]
        s1, i1, s2, i2 = s1[r0:r1, None], i1[r0:r1, None], s2[None, c0:c1], i2[None, c0:c1]
        rho = c.mul_(i1).mul_(i2).clamp_(-1.0, 1.0)
        if diagonal:
            rho.diagonal().fill_(1.0)
        c, dot = act.pair(rho, s1, s2, act.slice(e1, r0, r1), act.slice(e2, c0, c1),
                          need_dot=t is not None)
        if t is not None:
            last = layer == depth - 2
            t = torch.addcmul(c, t, dot, out=views["ntk"] if last else t)
    if "nngp" in views:
        views["nngp"].copy_(c)
    if "ntk" in views and t is None:
        views["ntk"].copy_(c)


class _ClosedForm:
    """Closed-form Gaussian expectations for relu, erf and identity."""

    def __init__(self, name: str, w2: float, b2: float, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.name, self.w2, self.b2 = name, w2, b2
        self.one = torch.ones((), dtype=dtype, device=device)

    def prepare(self, q: Tensor, sigma: Tensor) -> Tuple[None, Tensor]:
        """Next layer's variance ``w² E[φ(u)²] + b²`` for ``u ~ N(0, q)``."""
        if self.name == "relu":
            e = q / 2
        elif self.name == "erf":
            e = (2 / math.pi) * torch.asin(2 * q / (1 + 2 * q))
        else:
            e = q
        return None, self.w2 * e + self.b2

    @staticmethod
    def slice(extra, start: int, stop: int):
        return None

    def pair(self, rho: Tensor, s1: Tensor, s2: Tensor, e1, e2, *, need_dot: bool
             ) -> Tuple[Tensor, Optional[Tensor]]:
        """(w² E[φ(u)φ(v)] + b², w² E[φ'(u)φ'(v)]) from the clamped correlation; reuses ``rho``."""
        w2, b2 = self.w2, self.b2
        if self.name == "relu":
            # Correlations within 8 ulps of ±1 (rounding noise for duplicated or opposite
            # inputs) become exactly ±1: Σ̇ would turn that noise into O(sqrt(eps)) errors.
            near = 1 - 8 * torch.finfo(rho.dtype).eps
            lo, hi = torch.aminmax(rho)
            if float(hi) >= near or float(lo) <= -near:
                rho.masked_fill_(rho >= near, 1.0).masked_fill_(rho <= -near, -1.0)
            # E[relu(u) relu(v)] = σσ'/(2π) (sin θ + (π - θ) cos θ), E[step step] = (π - θ)/(2π),
            # with θ = acos ρ: π - θ = π/2 + asin ρ (asin is the cheaper one) and
            # sin θ = sqrt(1 - ρ²).
            pm = torch.asin(rho).add_(math.pi / 2)
            k = torch.addcmul(self.one, rho, rho, value=-1.0).sqrt_()
            k.addcmul_(rho, pm)
            k.mul_(s1 * (w2 / (2 * math.pi))).mul_(s2)
            if b2:
                k.add_(b2)
            return k, (pm.mul_(w2 / (2 * math.pi)) if need_dot else None)
        if self.name == "erf":
            # E[erf(u) erf(v)] = 2/π asin(2c / sqrt((1+2q)(1+2q'))),
            # E[erf'(u) erf'(v)] = 4/π / sqrt((1+2q)(1+2q') - 4c²)
            c = rho.mul_(s1).mul_(s2)
            a1, a2 = 1 + 2 * s1 * s1, 1 + 2 * s2 * s2
            dot = None
            if need_dot:
                dot = torch.mul(c, c).mul_(-4).add_(a1 * a2).rsqrt_().mul_(4 * w2 / math.pi)
            k = c.mul_(2 * a1.rsqrt()).mul_(a2.rsqrt()).clamp_(-1.0, 1.0).asin_()
            k.mul_(2 * w2 / math.pi).add_(b2)
            return k, dot
        k = rho.mul_(s1 * w2).mul_(s2).add_(b2)
        return k, (torch.full_like(k, w2) if need_dot else None)


class _Hermite:
    """Gaussian expectations of any elementwise φ through its Hermite (Mehler) expansion."""

    def __init__(self, fn: Callable[[Tensor], Tensor], degree: int, w2: float, b2: float,
                 dtype: torch.dtype, device: torch.device) -> None:
        z, sqrt_w, basis = _hermite_rule(degree)
        self.fn, self.w2, self.b2, self.dtype = fn, w2, b2, dtype
        self.z = torch.as_tensor(z, device=device)
        self.sqrt_w = torch.as_tensor(sqrt_w, device=device)
        self.basis_t = torch.as_tensor(basis.T.copy(), device=device)  # (node, k)
        self.n, self.kmax = degree, degree // 2
        self.eps = torch.finfo(dtype).eps

    def prepare(self, q: Tensor, sigma: Tensor) -> Tuple[Tuple[Tensor, Tensor], Tensor]:
        """Hermite coefficients of φ(σ·) and φ'(σ·) (N, n) and the next layer's variance."""
        s = sigma.to(torch.float64)
        with torch.enable_grad():
            pts = (s[:, None] * self.z[None, :]).requires_grad_(True)
            vals = self.fn(pts)
            if not isinstance(vals, Tensor) or vals.shape != pts.shape:
                got = tuple(vals.shape) if isinstance(vals, Tensor) else type(vals).__name__
                raise TypeError(f"analytic_ntk: the activation must be elementwise "
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
            raise ValueError(f"analytic_ntk: the activation or its derivative is not finite at "
                             f"the quadrature nodes (pre-activation std up to "
                             f"{float(s.max()):.3g}); use an activation that grows at most "
                             f"polynomially, or smaller w_std/b_std/inputs.")
        coef = (vals * self.sqrt_w).mm(self.basis_t)
        coef_d = (grads * self.sqrt_w).mm(self.basis_t)
        q_next = self.w2 * (coef * coef).sum(1) + self.b2
        return (coef.to(self.dtype), coef_d.to(self.dtype)), q_next.to(self.dtype)

    @staticmethod
    def slice(extra, start: int, stop: int):
        return extra[0][start:stop], extra[1][start:stop]

    def pair(self, rho: Tensor, s1: Tensor, s2: Tensor, e1, e2, *, need_dot: bool
             ) -> Tuple[Tensor, Optional[Tensor]]:
        k = self._series(rho, e1[0], e2[0]).mul_(self.w2).add_(self.b2)
        dot = self._series(rho, e1[1], e2[1]).mul_(self.w2) if need_dot else None
        return k, dot

    def _series(self, rho: Tensor, a1: Tensor, a2: Tensor) -> Tensor:
        """Σ_k a1[i, k] a2[j, k] ρ[i, j]^k with the tail beyond the cut folded at ρ = ±1."""
        kmax = self.kmax
        # Cut where the remaining terms up to kmax cannot add up to more than rounding.
        bound = a1.abs().amax(0) * a2.abs().amax(0)
        scale = float(torch.sqrt((a1 * a1).sum(1).max() * (a2 * a2).sum(1).max()))
        tail = torch.flip(torch.cumsum(torch.flip(bound[1:kmax + 1], (0,)), 0), (0,))
        above = torch.nonzero(tail > self.eps * scale)
        cut = int(above[-1]) + 1 if above.numel() else 0
        acc = torch.mul(a1[:, cut:cut + 1], a2[None, :, cut])
        for k in range(cut - 1, -1, -1):
            acc.mul_(rho).addcmul_(a1[:, k:k + 1], a2[None, :, k])
        for start in (cut + 1, cut + 2):
            if start < self.n:
                weight = torch.mm(a1[:, start::2], a2[:, start::2].T)
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
