"""``nn.LayerNorm`` without affine parameters, over all of a value's non-batch axes.

Its input must have zero mean over the channels at infinite width (the tracer checks that it
is an odd function of some layer's weights, e.g. an affine layer's output); then the
normalisation divides by the root of each input's mean variance ``m = mean_t K_xx[t, t]``:
``K' = K / sqrt((m + ε)(m' + ε))``, Θ likewise (ε the module's ``eps``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from torch_ntk.infinite.rules.base import Pair, Rule, Shape


class LayerNorm(Rule):
    name = "layer_norm"
    uses_variance = True

    def __init__(self, normalized_shape, eps: float, label: str) -> None:
        self.normalized_shape, self.eps, self.label = tuple(normalized_shape), float(eps), label

    def shape(self, inputs: Sequence[Shape]) -> Shape:
        (x,) = inputs
        whole = ((x.channels * x.positions,) if x.flat else (x.channels,) + tuple(x.spatial))
        if self.normalized_shape != whole and not (x.flat and self.normalized_shape == whole):
            raise ValueError(f"{self.label}: LayerNorm must normalise over all non-batch axes "
                             f"{whole} at this point of the network, got normalized_shape="
                             f"{self.normalized_shape}.")
        return x

    def prepare(self, variance: Tensor) -> Tensor:
        """Each input's ``1 / sqrt(mean_t q[t] + ε)``, (N,)."""
        m = variance.reshape(variance.shape[0], -1).mean(1) + self.eps
        return torch.where(m > 0, m.rsqrt(), torch.zeros_like(m))

    def apply(self, inputs, orients, out, side1=None, side2=None) -> Pair:
        (x,) = inputs
        side2 = side1 if out.aligned else side2
        d = x.nngp.dim() - 2
        r1 = side1.reshape((-1, 1) + (1,) * d)
        r2 = side2.reshape(((-1, 1) if out.aligned else (1, -1)) + (1,) * d)
        k = x.nngp * r1 * r2
        return Pair(k, None if x.ntk is None else x.ntk * r1 * r2)
