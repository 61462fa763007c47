"""What both engines hand to the Gram-sum op: per-block factors and their contraction.

A block of n inputs is described by gram_sum entries ``(h Tensor[n, p], d Tensor[n, K, q], c)``
whose share of the kernel is ``(h·h' + c)(d_a·d'_b)``. Per-sample gradients (or Jacobian
columns) ``g Tensor[n, K, P]`` are the entry ``(empty, g, 1)``: their share is ``g_a·g'_b``.
The contraction of every entry runs in one ``gram_sum`` call, which computes only the upper
triangle of a symmetric block.

Token entries ``(tokens Tensor[n, T], d Tensor[n, T, K, w])`` describe a lookup table (an
Embedding) sparsely: its share is ``Σ_{t,t'} [tok_t = tok'_t'] (d_t,a · d'_t',b)``, a sum over
the pairs of positions that read the same row, found by sorting (negative tokens read nothing).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor
import torch

from torch_ntk import _modes
from torch_ntk.native.gram import gram_sum

# Per-sample gradient blocks narrower than this are concatenated into one entry: the Gram-sum
# kernel spends a pass over the output tile per entry, which a narrow block doesn't amortise.
_NARROW = 4096


@dataclass
class Factors:
    """Per-block factors: gram_sum entries ``(h Tensor[n, p], d Tensor[n, K, q], c)``.

    ``group[l]`` is -1 for an entry that pairs with itself across the two sides, or the id of
    a set of entries (one per position of a layer) that pair with every entry of the set:
    ``Σ_{t,t'} (h_t·h'_t' + c)(d_t·d'_t')``.
    """

    h: list[Tensor] = field(default_factory=list)
    d: list[Tensor] = field(default_factory=list)
    c: list[float] = field(default_factory=list)
    group: list[int] = field(default_factory=list)
    tokens: list[Tensor] = field(default_factory=list)
    token_d: list[Tensor] = field(default_factory=list)
    outputs: Tensor | None = None     # the block's model output, Tensor[n, K]
    projection: Any = None            # verify.Projection of J r, when a direction was given
    # Per entry, the modules whose parameters it accounts for: (module name, first, stop) over
    # the last axis of d (a pooled gradient entry holds several); None: not known.
    segments: list[list[tuple]] = field(default_factory=list)
    token_owner: list[str | None] = field(default_factory=list)
    # Per entry, the parameters it accounts for (by name in the engine's ``params``): a Gram
    # entry's ``("gram", weight name or None, bias name or None, transposed)`` (d · (W h) +
    # sqrt(c) d · b; transposed: the weight is stored as Wᵀ),
    # a gradient entry's ``("grad", [(name, first, stop), ...])`` over the last axis of d;
    # per token entry the table's name. None: not known.
    params: list[tuple | None] = field(default_factory=list)
    token_params: list[str | None] = field(default_factory=list)

    def add(self, h: Tensor, d: Tensor, c: float, group: int = -1,
            owner: str | None = None, params: tuple | None = None) -> None:
        self.h.append(h)
        self.d.append(d)
        self.c.append(c)
        self.group.append(group)
        self.segments.append([(owner, 0, d.shape[-1])])
        self.params.append(params)

    def add_gradients(self, grads: list[Tensor], owners: list | None = None,
                      names: list | None = None) -> None:
        """Adds per-sample gradient blocks (each Tensor[n, K, P_l], of the module
        ``owners[l]``; ``names[l]`` lists its parameters in order as ``(name, numel)``),
        narrow ones pooled."""
        owners = [None] * len(grads) if owners is None else owners
        names = [None] * len(grads) if names is None else names
        blocks = list(zip(grads, owners, names))
        narrow = [b for b in blocks if b[0].shape[2] < _NARROW]
        wide = [b for b in blocks if b[0].shape[2] >= _NARROW]
        pooled = [narrow] if len(narrow) > 1 else []
        for part in [[b] for b in wide + (narrow if len(narrow) == 1 else [])] + pooled:
            g = part[0][0] if len(part) == 1 else torch.cat([b[0] for b in part], dim=2)
            owner = part[0][1] if len(part) == 1 else None
            self.add(g.new_empty(g.shape[0], 0), g, 1.0, owner=owner,
                     params=_gradient_layout([(b[0].shape[2], b[2]) for b in part]))
            if len(part) > 1:
                at, self.segments[-1] = 0, []
                for block, o, _ in part:
                    self.segments[-1].append((o, at, at + block.shape[2]))
                    at += block.shape[2]

    def add_tokens(self, tokens: Tensor, d: Tensor, owner: str | None = None,
                   param: str | None = None) -> None:
        """Adds a token entry: tokens Tensor[n, T] (int64, -1: none), d Tensor[n, T, K, w]."""
        self.tokens.append(tokens)
        self.token_d.append(d)
        self.token_owner.append(owner)
        self.token_params.append(param)

    def owners(self) -> set:
        """The modules the entries account for (None among them: some entry's isn't known)."""
        return {o for seg in self.segments for o, _, _ in seg} | set(self.token_owner)

    def of(self, owner: str) -> "Factors":
        """The entries of one module's parameters (``owners()`` must not hold None)."""
        out = Factors(outputs=self.outputs)
        for i, seg in enumerate(self.segments):
            for o, start, stop in seg:
                if o != owner:
                    continue
                whole = start == 0 and stop == self.d[i].shape[-1]
                out.add(self.h[i], self.d[i] if whole else self.d[i][..., start:stop],
                        self.c[i], self.group[i], owner=o,
                        params=self.params[i] if whole else _sliced(self.params[i], start, stop))
        for tok, d, o, name in zip(self.tokens, self.token_d, self.token_owner,
                                   self.token_params):
            if o == owner:
                out.add_tokens(tok, d, o, name)
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for t in (*self.h, *self.d, *self.tokens, *self.token_d))


def contract(f1: Factors, f2: Factors, mode: str, out: Tensor, symmetric: bool = False) -> Tensor:
    """Writes the kernel block between two factor sets into ``out`` and returns it.

    Args:
        f1, f2 (Factors): of blocks of N1 and N2 inputs (``f2 is f1`` when ``symmetric``).
        mode (str): ``"full"`` -> out Tensor[N1, N2, K, K], ``"trace"`` -> Tensor[N1, N2],
            ``"diagonal"`` -> Tensor[N1, N2, K].
        symmetric (bool): both sides are the same block; only the upper triangle is computed.
    """
    grouped = any(g >= 0 for g in f1.group)
    if not grouped:
        gram_sum(f1.h, f2.h, f1.d, f2.d, f1.c, mode=mode, out=out, symmetric=symmetric)
    else:
        h1, h2, d1, d2, c = _pair_positions(f1, f2)
        gram_sum(h1, h2, d1, d2, c, mode=mode, out=out)
    for tok1, td1, tok2, td2 in zip(f1.tokens, f1.token_d, f2.tokens, f2.token_d):
        _add_token_pairs(tok1, td1, tok2, td2, mode, out)
    if symmetric and (grouped or f1.tokens):
        out.copy_(_modes.mirror_upper(out, mode))
    return out


# Internal helpers

def _gradient_layout(blocks: list[tuple[int, list | None]]) -> tuple | None:
    """``("grad", [(name, first, stop), ...])`` for blocks of widths and ``(name, numel)``
    lists laid side by side; None when some block's parameters are not known."""
    if any(names is None for _, names in blocks):
        return None
    slices, at = [], 0
    for width, names in blocks:
        if sum(numel for _, numel in names) != width:
            return None
        for name, numel in names:
            slices.append((name, at, at + numel))
            at += numel
    return ("grad", slices)


def _sliced(layout: tuple | None, start: int, stop: int) -> tuple | None:
    """A gradient layout restricted to ``[start, stop)`` of the last axis, shifted to 0."""
    if layout is None or layout[0] != "grad":
        return None
    return ("grad", [(name, a - start, b - start) for name, a, b in layout[1]
                     if a >= start and b <= stop])


_PAIR_ELEMENTS = 2 ** 24  # entries of d gathered at once per side when contracting tokens


def _add_token_pairs(tok1: Tensor, d1: Tensor, tok2: Tensor, d2: Tensor, mode: str,
                     out: Tensor) -> None:
    """Adds ``Σ_{t,t'} [tok1[n, t] = tok2[m, t'] ≥ 0] d1[n, t] · d2[m, t']`` into ``out``.

    Args:
        tok1, tok2 (Tensor[N1, T1] / Tensor[N2, T2]): row indices (int64; negative: no row).
        d1, d2 (Tensor[N1, T1, K, w] / Tensor[N2, T2, K, w]): the output gradients there.
        mode (str), out (Tensor): as for ``contract``.
    """
    t1, t2 = tok1.shape[1], tok2.shape[1]
    k, w = d1.shape[2], d1.shape[3]
    flat1, flat2 = tok1.reshape(-1), tok2.reshape(-1)
    rows1, rows2 = d1.reshape(-1, k, w), d2.reshape(-1, k, w)
    order = torch.argsort(flat2, stable=True)
    sorted2 = flat2[order]
    lo = torch.searchsorted(sorted2, flat1, side="left")
    counts = torch.searchsorted(sorted2, flat1, side="right") - lo
    counts = torch.where(flat1 >= 0, counts, 0)
    ends = torch.cumsum(counts, 0)
    per_chunk = max(1, _PAIR_ELEMENTS // max(1, k * w))
    start, done = 0, 0
    while start < flat1.shape[0]:
        stop = int(torch.searchsorted(ends, done + per_chunk, side="right"))
        stop = min(max(stop, start + 1), flat1.shape[0])
        c = counts[start:stop]
        pairs = int(c.sum())
        if pairs:
            i = torch.repeat_interleave(torch.arange(start, stop, device=c.device), c)
            offset = torch.arange(pairs, device=c.device) - torch.repeat_interleave(
                torch.cumsum(c, 0) - c, c)
            j = order[torch.repeat_interleave(lo[start:stop], c) + offset]
            a, b = rows1[i], rows2[j]
            if mode == "full":
                vals = torch.bmm(a, b.transpose(1, 2))
            elif mode == "trace":
                vals = torch.einsum("pkw,pkw->p", a, b)
            else:
                vals = torch.einsum("pkw,pkw->pk", a, b)
            out.index_put_((i // t1, j // t2), vals.to(out.dtype), accumulate=True)
        done += pairs
        start = stop


def _pair_positions(f1: Factors, f2: Factors) -> tuple[list, list, list, list, list]:
    """gram_sum entries with every position of a group paired with every other one."""
    h1, h2, d1, d2, c = [], [], [], [], []
    members: dict[int, list[int]] = {}
    for i, g in enumerate(f1.group):
        members.setdefault(g, []).append(i)
    for g, idx in members.items():
        pairs = [(i, i) for i in idx] if g < 0 else [(i, j) for i in idx for j in idx]
        for i, j in pairs:
            h1.append(f1.h[i])
            h2.append(f2.h[j])
            d1.append(f1.d[i])
            d2.append(f2.d[j])
            c.append(f1.c[i])
    return h1, h2, d1, d2, c
