"""The native steps of the infinite-width engine (``torch_ntk::pair_chain``, csrc/pair_chain.h):
a chain of NTK convolutions, each fused with the closed-form activation after it, and average
poolings of the full position-pair layout, run a few pairs at a time through all the steps.
The pure-torch rules in ``torch_ntk.infinite.rules`` are the reference."""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from torch_ntk.native import route

ACTS = ("none", "relu", "leaky_relu", "erf")   # the op's act codes, in order
STEP_INTS, STEP_SCALES = 12, 3


def available(t: Tensor) -> bool:
    """Whether ``pair_chain`` runs for tensors like ``t`` (compiled, on, float32/float64)."""
    return route.native_available(t.device.type) and t.dtype in (torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class Step:
    """One step of a chain on 1 or 2 spatial axes.

    ``kind`` "conv": the mean over matching window offsets (``kernel``, ``stride``,
    ``dilation``, zero padding ``pad`` before each axis), ``K = w2 · mean + b2``, then ``act``
    (``"identity"`` is "none"); "pool": average pooling (``kernel``, ``stride``, no padding).
    ``out_size``: the output's spatial shape.
    """

    kind: str
    kernel: Tuple[int, ...]
    stride: Tuple[int, ...]
    out_size: Tuple[int, ...]
    dilation: Tuple[int, ...] = ()
    pad: Tuple[int, ...] = ()
    w2: float = 1.0
    b2: float = 0.0
    act: str = "none"
    slope: float = 0.0

    def encode(self) -> Tuple[List[int], List[float]]:
        """The op's ints and scales of this step (1-D steps as 2-D ones of height 1)."""
        d = len(self.kernel)

        def two(v, fill):
            v = tuple(v) if v else (fill,) * d
            return (fill,) + v if d == 1 else v

        act = "none" if self.act == "identity" else self.act
        ints = [0 if self.kind == "conv" else 1, ACTS.index(act), *two(self.kernel, 1),
                *two(self.stride, 1), *two(self.dilation, 1), *two(self.pad, 0),
                *two(self.out_size, 1)]
        return ints, [float(self.w2), float(self.b2), float(self.slope)]


def chain(k: Tensor, t: Optional[Tensor], steps: Sequence[Step], s1: Sequence[Tensor],
          s2: Sequence[Tensor], *, full: bool, ntk: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """A block's kernels through a chain of steps.

    Args:
        k (Tensor[B1, B2, *S[, *S]]): the input NNGP over position pairs (``full``) or per
            position; t: the input NTK like k, or None for zero.
        steps: the steps, in order; pooling needs ``full``.
        s1 (Tensor[B1, *S_out]), s2 (Tensor[B2, *S_out]): per step with an activation, in
            order, each input's standard deviation of the convolution's output.
        ntk: compute the NTK.
    Returns:
        (K, Θ) of shape (B1, B2, *S_out[, *S_out]) of the last step; Θ None without ``ntk``.
    """
    ints: List[int] = []
    scales: List[float] = []
    for step in steps:
        i, f = step.encode()
        ints += i
        scales += f
    k_out, t_out = torch.ops.torch_ntk.pair_chain(k, t, list(s1), list(s2), ints, scales, full,
                                                  ntk)
    return k_out, (t_out if ntk else None)
