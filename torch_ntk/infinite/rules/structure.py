"""The nodes that shape a network rather than compute: its input, the identity (nn.Identity,
nn.Dropout), constant scaling, flattening, and sums of branches (residual connections)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from torch_ntk.infinite.rules.base import Pair, Rule, Shape


class Input(Rule):
    """The network's input: ``K[t, t'] = Σ_c x_ct x'_ct' / C``, Θ = 0."""

    name = "input"

    def shape(self, inputs: Sequence[Shape]) -> Shape:
        raise AssertionError("the input's shape comes from the data")

    def kernel(self, x1: Tensor, x2: Tensor, full: bool, aligned: bool) -> Pair:
        """x1 (B1, C, *S), x2 (B2, C, *S) -> the input's Pair in the requested layout."""
        c, s = x1.shape[1], tuple(x1.shape[2:])
        p = math.prod(s)
        a, b = x1.reshape(x1.shape[0], c, p), x2.reshape(x2.shape[0], c, p)
        if aligned:
            if full:
                k = torch.bmm(a.transpose(1, 2), b).div_(c).reshape((a.shape[0], 1) + s + s)
            else:
                k = (a * b).mean(1).reshape((a.shape[0], 1) + s)
        elif full:
            k = torch.mm(a.transpose(1, 2).reshape(-1, c), b.transpose(1, 2).reshape(-1, c).T)
            k = k.div_(c).reshape(a.shape[0], p, b.shape[0], p).transpose(1, 2)
            k = k.reshape((a.shape[0], b.shape[0]) + s + s)
        elif p == 1:   # features: one GEMM, scaled as it is written
            zero = torch.zeros((), dtype=a.dtype, device=a.device)
            k = torch.addmm(zero, a[..., 0], b[..., 0].T, beta=0, alpha=1.0 / c)
        else:
            k = torch.bmm(a.permute(2, 0, 1), b.permute(2, 1, 0)).div_(c).permute(1, 2, 0)
            k = k.reshape((a.shape[0], b.shape[0]) + s)
        return Pair(k, None)


class Identity(Rule):
    """nn.Identity, nn.Dropout (the identity at infinite width, as in neural-tangents)."""

    name = "identity"
    linear = True

    def shape(self, inputs: Sequence[Shape]) -> Shape:
        return inputs[0]

    def apply(self, inputs, orients, out, side1=None, side2=None) -> Pair:
        return inputs[0]


class Scale(Rule):
    """``c · x`` for a constant c: K and Θ scale by c²."""

    name = "scale"
    linear = True

    def __init__(self, factor: float) -> None:
        self.factor = float(factor)

    def shape(self, inputs: Sequence[Shape]) -> Shape:
        return inputs[0]

    def apply(self, inputs, orients, out, side1=None, side2=None) -> Pair:
        (x,), c2 = inputs, self.factor ** 2
        return Pair(x.nngp * c2, None if x.ntk is None else x.ntk * c2)


class Flatten(Rule):
    """``nn.Flatten()`` / ``torch.flatten(x, 1)``: marks the map flattened; the next dense
    layer averages the kernel over the positions (elementwise layers in between act per
    position)."""

    name = "flatten"
    linear = True

    def __init__(self, label: str) -> None:
        self.label = label

    def shape(self, inputs: Sequence[Shape]) -> Shape:
        (x,) = inputs
        if not x.spatial or x.flat:
            return x
        return Shape(channels=x.channels, spatial=x.spatial, flat=True)

    def apply(self, inputs, orients, out, side1=None, side2=None) -> Pair:
        return inputs[0]


class Add(Rule):
    """A sum of branches whose cross-covariances vanish (the tracer checks this): K and Θ
    add."""

    name = "add"

    def __init__(self, label: str) -> None:
        self.label = label

    def shape(self, inputs: Sequence[Shape]) -> Shape:
        if any(s != inputs[0] for s in inputs[1:]):
            raise ValueError(f"{self.label} adds values of different shapes: "
                             f"{', '.join(str(s) for s in inputs)}.")
        return inputs[0]

    def apply(self, inputs, orients, out, side1=None, side2=None) -> Pair:
        k = inputs[0].nngp.clone()
        t = None
        for x in inputs[1:]:
            k.add_(x.nngp)
        if out.ntk:
            for x in inputs:
                if x.ntk is not None:
                    t = x.ntk.clone() if t is None else t.add_(x.ntk)
        return Pair(k, t)
