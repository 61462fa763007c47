"""What every infinite-width rule works on: the static ``Shape`` of a node, the ``Pair`` of
kernels it holds for a block of input pairs, the ``Orientation`` that lines per-input data up
with those pairs, and the ``Rule`` interface.

A node's kernels for a block of ``B1 × B2`` input pairs are tensors of shape
``(B1, B2, *S)`` when only the covariance of each position with itself across the two inputs
is kept ("diagonal": K[t, t]) and ``(B1, B2, *S, *S)`` when all pairs of positions are kept
("full": K[t, t']), S the node's spatial shape (``()`` for dense features). The self pass runs
the same rules on the pairs (x, x) of one input set, with ``B2 == 1`` and the two sides aligned.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class Shape:
    """Static description of a node's value.

    Attributes:
        channels (int): channels (features) of the finite network's value; only checked
            against the layers' sizes.
        spatial (tuple of int): the spatial shape S (``()`` for dense features).
        flat (bool): flattened by ``nn.Flatten``: the next dense layer averages over positions.
    """

    channels: int
    spatial: Tuple[int, ...] = ()
    flat: bool = False

    @property
    def positions(self) -> int:
        return math.prod(self.spatial)


@dataclasses.dataclass
class Pair:
    """The NNGP ``nngp`` and NTK ``ntk`` of a node for a block of input pairs.

    ``ntk`` is ``None`` when it is zero (the input) or not asked for. ``owned``: the engine
    hands this value to its last reader, which may overwrite its tensors.
    """

    nngp: Tensor
    ntk: Optional[Tensor]
    owned: bool = False


@dataclasses.dataclass(frozen=True)
class Orientation:
    """How a block's pairs are laid out: ``full`` position pairs or the diagonal, the spatial
    shape S, whether it is the self pass (pairs (x, x), sides aligned), and whether the NTK is
    computed besides the NNGP."""

    full: bool
    spatial: Tuple[int, ...]
    aligned: bool = False
    ntk: bool = True

    def left(self, t: Tensor) -> Tensor:
        """Per-input, per-position data of the first side, (B1, *S) -> broadcastable view."""
        d = len(self.spatial)
        view = t.unsqueeze(1)
        return view.reshape(view.shape + (1,) * d) if self.full else view

    def right(self, t: Tensor) -> Tensor:
        """Per-input, per-position data of the second side, (B2, *S) -> broadcastable view."""
        d = len(self.spatial)
        if self.aligned:
            view = t.unsqueeze(1)
        else:
            view = t.unsqueeze(0)
        if self.full:
            view = view.reshape(view.shape[:2] + (1,) * d + tuple(self.spatial))
        return view

    def dot(self, a: Tensor, b: Tensor) -> Tensor:
        """Σ_k a[i, t, k] b[j, t', k] laid out as a pair tensor; a (B1, *S, m), b (B2, *S, m)."""
        n1, n2, m = a.shape[0], b.shape[0], a.shape[-1]
        p = math.prod(self.spatial)
        s = tuple(self.spatial)
        a, b = a.reshape(n1, p, m), b.reshape(n2, p, m)
        if self.aligned:
            if self.full:
                return torch.bmm(a, b.transpose(1, 2)).reshape((n1, 1) + s + s)
            return (a * b).sum(-1).reshape((n1, 1) + s)
        if self.full:
            out = torch.mm(a.reshape(n1 * p, m), b.reshape(n2 * p, m).T)
            return out.reshape(n1, p, n2, p).transpose(1, 2).reshape((n1, n2) + s + s)
        out = torch.bmm(a.transpose(0, 1), b.permute(1, 2, 0))     # (P, B1, B2)
        return out.permute(1, 2, 0).reshape((n1, n2) + s)

    def diagonal(self, t: Tensor) -> Tensor:
        """The entries t = t' of a pair tensor, (B1, B2, *S[, *S]) -> (B1, B2, *S)."""
        if not self.full:
            return t
        p, s = math.prod(self.spatial), tuple(self.spatial)
        return t.reshape(t.shape[:2] + (p, p)).diagonal(dim1=2, dim2=3).reshape(t.shape[:2] + s)


class Rule:
    """One node of an infinite-width program: how it transforms its inputs' kernels.

    Subclasses set ``name`` and implement ``shape`` and ``apply``; rules that read each input's
    own variance per position (activations, normalisation) set ``uses_variance`` and implement
    ``prepare``.
    """

    name = "rule"
    uses_variance = False
    linear = False   # the output is a linear map of the input (keeps it odd in any weights)

    def shape(self, inputs: Sequence[Shape]) -> Shape:
        """The output's static shape; raises ValueError for inputs the layer can't take."""
        raise NotImplementedError

    def input_full(self, out_full: bool, index: int) -> bool:
        """Whether input ``index`` must hold all position pairs when the output does
        (``out_full``) or doesn't."""
        return out_full

    def prepare(self, variance: Tensor) -> object:
        """Per-input data from the variance of each position of the input, (N, *S) -> any
        object ``slice_side`` can cut into rows."""
        raise NotImplementedError

    @staticmethod
    def slice_side(side, start: int, stop: int):
        """Rows ``start:stop`` of what ``prepare`` returned."""
        if isinstance(side, Tensor):
            return side[start:stop]
        return tuple(s[start:stop] for s in side)

    def apply(self, inputs: Sequence[Pair], orients: Sequence[Orientation], out: Orientation,
              side1=None, side2=None) -> Pair:
        """The output kernels of one block; ``orients`` and ``out`` give the inputs' and the
        output's layouts, ``side1``/``side2`` the rows of ``prepare``'s data for the two
        sides of the block."""
        raise NotImplementedError
