"""What every block of inputs is checked against before its factors are used.

For a block X of n samples and a random direction r in parameter space (one Tensor per
trainable parameter, fixed by a seed: rank one ``a bᵀ`` for matrices, entries N(0, 1) for the
rest; see ``direction``), forward-mode autograd gives
``u = J(X) r`` (Tensor[n, K]) through the model's *real* parameter tensors: their tangents are
set on the very objects the model holds, so uses outside registered attributes (a weight kept
in a Python list, read by a hook, passed to ``F.linear`` on some samples) all count. The
engines predict the same product from their factors (``Projection``): per Gram entry
``d_a · (R h)`` plus the bias term, per per-sample-gradient block ``g_a · r``, per token entry
``d_t,a · E_r[token_t]``. ``u = û`` for every sample and output (to rounding) is what "this
sample's gradient is the one the factors describe" means, with probability 1 over r.

The forward runs on the block split into two sub-batches in another order (reversed), so the
same pass also checks that each sample's output doesn't depend on which samples share its
batch: the sub-batches' outputs must equal the block's. Where the factors are each sample's
alone (the Jacobian under ``torch.func.vmap``, which runs the model on batches of one), the
whole block reversed is already another batch for every sample: one forward instead of two.
A single batch holding every sample would not do for factors of the whole block: an output
that depends on the others only through a statistic of the set (a detached batch sum) is the
same in any order.

Where forward-mode autograd is missing for some operation (a custom ``autograd.Function``
without ``jvp``), ``u`` comes from reverse-over-reverse (``∂/∂v ⟨∇_θ(v·f), r⟩``), still
through the real parameters; where neither runs, ``jvp`` returns None and the caller decides.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from torch_ntk.empirical import checks

# One forward-AD level per process: calls on other threads wait here.
_DUAL_LEVEL = threading.RLock()
_SEED = 20261201

# |u - û| allowed per entry, relative to the sum of the absolute values of the terms both sides
# add up (``Projection.bound``, a Cauchy-Schwarz bound per term), in units of the dtype's eps.
# Measured on the test and benchmark zoos (MLPs, residual, LayerNorm, conv, embedding,
# Transformer, recurrent models): at most 2 eps (3e-16 in float64, 1.9e-7 in float32).
# Half precision computes the model in half but the check in float32: fewer eps to spare.
_EPS_ALLOWED, _HALF_EPS_ALLOWED = 300.0, 30.0


def tolerance(dtype: torch.dtype) -> float:
    """Allowed ``|u - û| / bound`` for a model that computes in ``dtype`` (its least precise
    floating dtype, see ``computing_dtype``)."""
    wide = dtype in (torch.float32, torch.float64)
    return (_EPS_ALLOWED if wide else _HALF_EPS_ALLOWED) * torch.finfo(dtype).eps


class _FloatDtypes(TorchFunctionMode):
    """Records the floating dtypes of every torch function's tensor outputs, and their bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[torch.dtype] = set()
        self.bytes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in (out,) if isinstance(out, Tensor) else pytree.tree_leaves(out):
            if isinstance(leaf, Tensor) and leaf.is_floating_point():
                self.seen.add(leaf.dtype)
                self.bytes += leaf.numel() * leaf.element_size()
        return out


def computing_dtype(forward, dtype: torch.dtype):
    """Runs ``forward()`` and returns (its result, the least precise floating dtype any torch
    function in it produced, ``dtype`` at most, and the bytes of the floating tensors they
    produced): a float64 model whose norms compute in float32 (e.g. Hugging Face's RMSNorm) is
    only as exact as float32; the bytes bound what a forward keeps for its reverse pass."""
    with _FloatDtypes() as mode:
        result = forward()
    return result, least_precise(*mode.seen, dtype), mode.bytes


def least_precise(*dtypes: torch.dtype) -> torch.dtype:
    """The floating dtype of largest eps among ``dtypes``."""
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


class Direction(dict):
    """The direction r by parameter name; ``outer[id(t)] = (a, b)`` for each rank-one
    ``t = a bᵀ`` among its values (the dict holds them, so the ids stay theirs); ``zero``
    names the parameters whose direction is zero (no tangent needed)."""

    outer: dict[int, tuple[Tensor, Tensor]]
    zero: set[str]


def direction(model: nn.Module, params: dict[str, Tensor]) -> Direction:
    """The random direction r: Tensor like each parameter, the same on every call.

    A parameter of two or more axes gets a rank-one direction ``a bᵀ`` (a over its first axis,
    b over the rest, entries N(0, 1)); others N(0, 1) entries. ``aᵀ M b`` is a nonzero
    polynomial in (a, b) for any nonzero M, so a wrong gradient is still seen with probability
    1, and a Gram layer's prediction ``d · (a bᵀ h)`` costs ``(d · a)(b · h)``
    (``Projection.add_gram``). Where autograd's gradient is by design not the derivative of the
    forward, r is zero, so that forward mode sees what the backward does: the padding row of an
    Embedding (never updated), and the whole table of one with ``scale_grad_by_freq`` (its
    gradient is scaled by token counts; its share comes from each sample's own autograd
    gradient, unchecked).
    """
    first = next(iter(params.values()))
    gen = torch.Generator(device=first.device).manual_seed(_SEED)
    factors = {}
    for name, p in params.items():
        sizes = (p.shape[0], p[0].numel()) if p.dim() >= 2 else (p.numel(),)
        factors[name] = [torch.randn(n, generator=gen, device=p.device, dtype=p.dtype)
                         for n in sizes]
    name_of = {id(p): name for name, p in params.items()}
    zero: set[str] = set()
    for module in model.modules():
        name = name_of.get(id(getattr(module, "weight", None)))
        if name is None or not isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            continue
        if module.scale_grad_by_freq:
            factors[name][0].zero_()
            zero.add(name)
        elif module.padding_idx is not None:
            factors[name][0][module.padding_idx] = 0
    r = Direction()
    r.outer, r.zero = {}, zero
    for name, p in params.items():
        if p.dim() >= 2:
            a, b = factors[name]
            r[name] = torch.outer(a, b).reshape(p.shape)
            r.outer[id(r[name])] = (a, b)
        else:
            r[name] = factors[name][0].reshape(p.shape)
    return r


class Projection:
    """Accumulates an engine's prediction ``û = J r`` (Tensor[n, K]) and its rounding scale.

    Half-precision factors are widened to float32 so the check itself can't overflow.
    """

    def __init__(self, n: int, k: int, dtype: torch.dtype, device: torch.device,
                 r: dict[str, Tensor]) -> None:
        self.dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        self.outer = getattr(r, "outer", {})
        self.value = torch.zeros(n, k, dtype=self.dtype, device=device)
        self.bound = torch.zeros(n, k, dtype=self.dtype, device=device)

    def add_gram(self, h: Tensor, d: Tensor, c: float, weight: Tensor,
                 bias: Tensor | None) -> None:
        """Entry ``(h [n, p], d [n, K, q], c)`` along ``weight`` (q, p) and ``bias`` (q)."""
        d = d.to(self.dtype)
        d_norm = torch.linalg.vector_norm(d, dim=2)
        outer = self.outer.get(id(weight))
        if h.shape[1] and outer is not None:  # R = a bᵀ: d · (R h) = (d · a)(b · h)
            a, b = (t.to(self.dtype) for t in outer)
            bh = h.to(self.dtype) @ b                                         # (n,)
            self.value += (d @ a) * bh[:, None]
            self.bound += d_norm * (torch.linalg.vector_norm(a) * bh.abs())[:, None]
        elif h.shape[1]:
            rh = h.to(self.dtype) @ weight.to(self.dtype).T                  # (n, q)
            self.value += torch.einsum("nkq,nq->nk", d, rh)
            self.bound += d_norm * torch.linalg.vector_norm(rh, dim=1, keepdim=True)
        if bias is not None and c:
            scale = math.sqrt(c)
            b = bias.to(self.dtype)
            self.value += scale * (d @ b)
            self.bound += scale * d_norm * torch.linalg.vector_norm(b)

    def add_positions(self, h: Tensor, d: Tensor, c: float, weight: Tensor,
                      bias: Tensor | None) -> None:
        """Gram entries of every position at once: ``h [n, T, p]``, ``d [n, T, K, q]``
        (``add_gram`` of each position, summed)."""
        d = d.to(self.dtype)
        d_norm = torch.linalg.vector_norm(d, dim=3)                         # (n, T, K)
        outer = self.outer.get(id(weight))
        if h.shape[2] and outer is not None:  # R = a bᵀ: d · (R h) = (d · a)(b · h)
            a, b = (t.to(self.dtype) for t in outer)
            bh = h.to(self.dtype) @ b                                       # (n, T)
            self.value += ((d @ a) * bh[..., None]).sum(1)
            self.bound += (d_norm * bh.abs()[..., None]).sum(1) * torch.linalg.vector_norm(a)
        elif h.shape[2]:
            rh = h.to(self.dtype) @ weight.to(self.dtype).T                 # (n, T, q)
            self.value += torch.einsum("ntkq,ntq->nk", d, rh)
            self.bound += (d_norm * torch.linalg.vector_norm(rh, dim=2)[..., None]).sum(1)
        if bias is not None and c:
            scale = math.sqrt(c)
            b = bias.to(self.dtype)
            self.value += scale * (d @ b).sum(1)
            self.bound += scale * d_norm.sum(1) * torch.linalg.vector_norm(b)

    def add_gradients(self, g: Tensor, r: Tensor) -> None:
        """Per-sample gradients ``g [n, K, P]`` along ``r`` (P)."""
        g, r = g.to(self.dtype), r.to(self.dtype)
        self.value += g @ r
        self.bound += torch.linalg.vector_norm(g, dim=2) * torch.linalg.vector_norm(r)

    def add_tokens(self, tokens: Tensor, d: Tensor, table: Tensor) -> None:
        """Token entry ``(tokens [n, T], d [n, T, K, w])`` along the table direction (V, w)."""
        rows = table.to(self.dtype)[tokens.clamp_min(0)] * (tokens >= 0).unsqueeze(-1)
        d = d.to(self.dtype)
        self.value += torch.einsum("ntkw,ntw->nk", d, rows)
        self.bound += torch.einsum("ntk,nt->nk", torch.linalg.vector_norm(d, dim=3),
                                   torch.linalg.vector_norm(rows, dim=2))


@dataclass
class Split:
    """The model on a block reordered (two sub-batches, or one): outputs and ``J r``."""

    outputs: Tensor        # Tensor[n, K], rows in the block's order
    jvp: Tensor | None     # Tensor[n, K], None when no autograd mode could compute it


def split_forward(model: nn.Module, params: dict[str, Tensor], x: Tensor,
                  r: dict[str, Tensor], want_jvp: bool = True, reverse: bool = False,
                  halves: bool = True) -> Split:
    """Runs the model on x (Tensor[n, *in_shape]) as two sub-batches in reversed order, or
    as one batch, reversed, without ``halves``; ``reverse`` takes ``J r`` from two reverse
    passes even where forward mode runs."""
    n = x.shape[0]
    order = torch.arange(n - 1, -1, -1, device=x.device)
    parts = [order[: n // 2], order[n // 2:]] if n > 1 and halves else [order]
    results = [_forward(model, params, x[idx], r, want_jvp, reverse) for idx in parts]
    inverse = torch.argsort(torch.cat(parts))
    outputs = torch.cat([f for f, _ in results])[inverse]
    if any(u is None for _, u in results):
        return Split(outputs, None)
    return Split(outputs, torch.cat([u for _, u in results])[inverse])


@dataclass
class Verdict:
    """What ``check`` found on a block: ``ok``, or the first problem and where.

    ``kind`` is "interact" (a sample's output changed with the samples beside it), "mismatch"
    (the factors' ``J r`` differs from the model's) or "unverifiable" (no autograd mode could
    compute the model's ``J r``); ``sample`` indexes the block; ``error`` is the mismatch
    over its rounding scale.
    """

    ok: bool
    kind: str = ""
    sample: int = -1
    error: float = 0.0
    factors: Any = None


def check(engine, x: Tensor, r: dict[str, Tensor], factors=None,
          dtype: torch.dtype | None = None, reverse: bool = False) -> Verdict:
    """Checks an engine's factors of the block x (computed here when not given) against the
    model's outputs and ``J r`` on the block reordered (``split_forward``: in one batch for an
    engine whose factors are each sample's alone, ``engine.per_sample``), to the rounding of
    ``dtype`` (the model's computing dtype; the outputs' by default); ``reverse`` as for
    ``split_forward``.

    TorchScript modules get only the outputs' check: their optimising executor may drop
    forward-mode tangents, so their ``J r`` is "unverifiable" (the caller then relies on plain
    autograd through the real model).
    """
    if factors is None:
        factors = engine.factors(x, r)
    scripted = any(isinstance(m, torch.jit.ScriptModule) for m in engine.model.modules())
    split = split_forward(engine.model, engine.params, x, r, want_jvp=not scripted,
                          reverse=reverse, halves=not getattr(engine, "per_sample", False))
    f = factors.outputs
    if f.numel():
        scale = float(f.abs().max()) + float(split.outputs.abs().max()) + 1e-30
        tol = checks.rounding_tolerance(dtype or f.dtype, f.shape[1])
        moved = (split.outputs - f).abs().amax(dim=1) > tol * scale
        if bool(moved.any()):
            return Verdict(False, "interact", int(moved.nonzero()[0, 0]), factors=factors)
    if split.jvp is None:
        return Verdict(False, "unverifiable", factors=factors)
    error, sample = worst(split.jvp, factors.projection)
    ok = error <= tolerance(dtype or f.dtype)
    return Verdict(ok, "" if ok else "mismatch", sample, error, factors)


def worst(u: Tensor, projection: Projection) -> tuple[float, int]:
    """(largest ``|u - û| / bound`` over the block, the sample where it occurs)."""
    err = (u.to(projection.dtype) - projection.value).abs()
    scale = projection.bound + u.to(projection.dtype).abs()
    tiny = torch.finfo(projection.dtype).tiny
    ratio = torch.where(err > 0, err / scale.clamp_min(tiny), torch.zeros_like(err))
    ratio = torch.nan_to_num(ratio, nan=float("inf"))
    per_sample = ratio.amax(dim=1) if ratio.shape[1] else ratio.new_zeros(ratio.shape[0])
    value, index = per_sample.max(dim=0)
    return float(value), int(index)


# Internal helpers

def _forward(model: nn.Module, params: dict[str, Tensor], x: Tensor, r: dict[str, Tensor],
             want_jvp: bool, reverse: bool) -> tuple[Tensor, Tensor | None]:
    """(f Tensor[m, K], J r Tensor[m, K] or None) on one sub-batch."""
    if not want_jvp:
        with torch.enable_grad():
            return _flat(model(x), x.shape[0]).detach(), None
    try:
        if not reverse:
            return _forward_mode(model, params, x, r)
    except (RuntimeError, NotImplementedError) as exc:
        if not _is_missing_formula(exc):
            raise
    try:
        return _reverse_over_reverse(model, params, x, r)
    except (RuntimeError, NotImplementedError):
        with torch.enable_grad():
            return _flat(model(x), x.shape[0]).detach(), None


def _forward_mode(model: nn.Module, params: dict[str, Tensor], x: Tensor,
                  r: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Tangents set on the real parameter objects (their values copied onto themselves as dual
    tensors under ``no_grad``), one forward with grad mode on, as the engines run theirs; the
    parameters' version counters are put back."""
    moving = [name for name in params if name not in getattr(r, "zero", ())]
    tensors = [params[name] for name in moving]
    versions = [p._version for p in tensors]
    with _DUAL_LEVEL, fwAD.dual_level():
        try:
            with torch.no_grad():  # the values onto themselves, with a tangent
                for p, name in zip(tensors, moving):
                    p.copy_(fwAD.make_dual(p.detach(), r[name]))
            # grad mode on, as the engines' forwards run (a model may branch on it); no
            # tangents through what the model computes under no_grad, as autograd has none
            with torch.enable_grad(), _NoGradStopsTangents():
                f = _flat(model(x), x.shape[0])
            primal, tangent = fwAD.unpack_dual(f)
            primal = primal.detach().clone()
            tangent = (torch.zeros_like(primal) if tangent is None
                       else tangent.detach().clone())
        finally:
            _set_versions(tensors, versions)
    return primal, tangent


class _NoGradStopsTangents(TorchFunctionMode):
    """Forward-mode autograd as reverse mode sees it: an operation run under ``no_grad`` inside
    the model (a norm of a weight taken as a constant) gives outputs without tangents."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.is_grad_enabled():
            return func(*args, **kwargs)
        enabled = torch._C._is_fwd_grad_enabled()
        torch._C._set_fwd_grad_enabled(False)
        try:
            return func(*args, **kwargs)
        finally:
            torch._C._set_fwd_grad_enabled(enabled)


def _reverse_over_reverse(model: nn.Module, params: dict[str, Tensor], x: Tensor,
                          r: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``J r`` as the derivative of the linear map ``v -> r · J^T v`` (two reverse passes)."""
    tensors = list(params.values())
    with torch.enable_grad():
        f = _flat(model(x), x.shape[0])
        v = torch.zeros_like(f, requires_grad=True)
        if not f.requires_grad:
            return f.detach(), torch.zeros_like(f)
        grads = torch.autograd.grad(f, tensors, v, create_graph=True, allow_unused=True)
        if any(g is not None and not g.requires_grad for g in grads) or _has_error_node(grads):
            # a backward that can't be differentiated (``once_differentiable``): its part of
            # the second pass would silently be zero
            raise RuntimeError("double backward not implemented through the model")
        used = [(g, r[name]) for g, name in zip(grads, params) if g is not None]
        if not used:
            return f.detach(), torch.zeros_like(f)
        (u,) = torch.autograd.grad([g for g, _ in used], v, [t for _, t in used],
                                   allow_unused=True)
    return f.detach(), torch.zeros_like(f) if u is None else u.detach()


def _has_error_node(grads) -> bool:
    """True when the graph of a first-pass gradient holds autograd's placeholder for a backward
    that can't be differentiated (the node ``once_differentiable`` leaves)."""
    stack = [g.grad_fn for g in grads if g is not None and g.grad_fn is not None]
    seen: set = set()   # the nodes themselves: kept alive, so no identity is reused
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name() == "torch::autograd::Error":
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


def _flat(f: object, m: int) -> Tensor:
    if not isinstance(f, Tensor):
        raise TypeError(
            f"empirical_ntk: the model must return one Tensor, got {type(f).__name__}.")
    return f.reshape(m, -1)


def _is_missing_formula(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, NotImplementedError) or any(
        s in text for s in ("forward ad", "forward-mode", "forward mode", "jvp",
                            "not implemented", "dual"))


def _set_versions(tensors: list[Tensor], versions: list[int]) -> None:
    """Puts back version counters that copying a tensor onto itself bumped (so autograd graphs
    the caller saved before the call stay valid)."""
    setter = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)
    if setter is None:
        return
    try:
        setter(tuple(tensors), tuple(versions))
    except (TypeError, RuntimeError):
        for t, v in zip(tensors, versions):
            setter(t, v)
