"""What both engines hand to the Gram-sum op: per-block factors and their contraction.

A block of n inputs is described by gram_sum entries ``(h Tensor[n, p], d Tensor[n, K, q], c)``
whose share of the kernel is ``(h·h' + c)(d_a·d'_b)``. Per-sample gradients (or Jacobian
columns) ``g Tensor[n, K, P]`` are the entry ``(empty, g, 1)``: their share is ``g_a·g'_b``.
The contraction of every entry runs in one ``gram_sum`` call, which computes only the upper
triangle of a symmetric block.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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

    def add(self, h: Tensor, d: Tensor, c: float, group: int = -1) -> None:
        self.h.append(h)
        self.d.append(d)
        self.c.append(c)
        self.group.append(group)

    def add_gradients(self, grads: list[Tensor]) -> None:
        """Adds per-sample gradient blocks (each Tensor[n, K, P_l]), narrow ones pooled."""
        narrow = [g for g in grads if g.shape[2] < _NARROW]
        wide = [g for g in grads if g.shape[2] >= _NARROW]
        if len(narrow) > 1:
            narrow = [torch.cat(narrow, dim=2)]
        for g in wide + narrow:
            self.add(g.new_empty(g.shape[0], 0), g, 1.0)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.h, *self.d))


def contract(f1: Factors, f2: Factors, mode: str, out: Tensor, symmetric: bool = False) -> Tensor:
    """Writes the kernel block between two factor sets into ``out`` and returns it.

    Args:
        f1, f2 (Factors): of blocks of N1 and N2 inputs (``f2 is f1`` when ``symmetric``).
        mode (str): ``"full"`` -> out Tensor[N1, N2, K, K], ``"trace"`` -> Tensor[N1, N2],
            ``"diagonal"`` -> Tensor[N1, N2, K].
        symmetric (bool): both sides are the same block; only the upper triangle is computed.
    """
    if all(g < 0 for g in f1.group):
        return gram_sum(f1.h, f2.h, f1.d, f2.d, f1.c, mode=mode, out=out, symmetric=symmetric)
    h1, h2, d1, d2, c = _pair_positions(f1, f2)
    gram_sum(h1, h2, d1, d2, c, mode=mode, out=out)
    return out.copy_(_modes.mirror_upper(out, mode)) if symmetric else out


# Internal helpers

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
