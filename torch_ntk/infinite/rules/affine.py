"""NTK affine layers: dense (``NTKLinear``) and convolutions (``NTKConv1d``/``NTKConv2d``).

With ``z = w / sqrt(fan_in) · W h + b · β`` and ``W, β ~ N(0, 1)``, independent of everything
before, as the fan-in grows::

    K' = w² · mean K_in + b²,     Θ' = w² · mean Θ_in + K'

where the mean is over the features a dense layer reads (over the positions, for a flattened
map) and, for a convolution, over the window offsets d: ``K_in[s·t + d, s·t' + d]`` (zero
outside the padded input; the mean still divides by the window size).
"""
from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from torch_ntk.infinite.rules.activations import _constant
from torch_ntk.infinite.rules.base import Orientation, Pair, Rule, Shape


class Dense(Rule):
    """A fully-connected NTK layer on features (or on a flattened map); ``in_features`` None
    takes any width (the ``depth=`` MLP, whose widths are immaterial)."""

    name = "dense"

    def __init__(self, in_features: Optional[int], w_std: float, b_std: float, label: str,
                 out_features: Optional[int] = None) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.w2, self.b2, self.label = w_std ** 2, b_std ** 2, label

    def shape(self, inputs: Sequence[Shape]) -> Shape:
        (x,) = inputs
        if x.spatial and not x.flat and x.positions > 1:
            raise ValueError(f"{self.label} is applied to a feature map with spatial shape "
                             f"{x.spatial}; flatten it first (nn.Flatten()) or pool it "
                             f"(nn.AdaptiveAvgPool2d(1)).")
        features = x.channels * (x.positions if x.flat else 1)
        if self.in_features is not None and features != self.in_features:
            raise ValueError(f"{self.label} expects {self.in_features} input features, the "
                             f"network gives it {features}.")
        return Shape(channels=self.out_features or 0)

    def input_full(self, out_full: bool, index: int) -> bool:
        return False

    def apply(self, inputs, orients, out, side1=None, side2=None) -> Pair:
        (x,), (o,) = inputs, orients
        k, t = x.nngp, x.ntk
        if o.spatial:
            dims = tuple(range(2, 2 + len(o.spatial)))
            k = o.diagonal(k).mean(dims)
            t = None if t is None else o.diagonal(t).mean(dims)
        return _affine(k, t, self.w2, self.b2, out.ntk, owned=x.owned and not o.spatial)


class Conv(Rule):
    """An ``NTKConv1d``/``NTKConv2d``: the mean over matching window offsets, then affine."""

    name = "conv"

    def __init__(self, module, label: str) -> None:
        self.module, self.label = module, label
        self.w2, self.b2 = module.w_std ** 2, module.b_std ** 2
        self.pads: Tuple[Tuple[int, int], ...] = ()

    def shape(self, inputs: Sequence[Shape]) -> Shape:
        (x,) = inputs
        m = self.module
        if len(x.spatial) != m.dims or x.flat:
            raise ValueError(f"{self.label} ({type(m).__name__}) needs an input with {m.dims} "
                             f"spatial axes, the network gives it "
                             f"{'a flattened value' if x.flat else f'spatial shape {x.spatial}'}.")
        if x.channels != m.in_channels:
            raise ValueError(f"{self.label} expects {m.in_channels} input channels, the "
                             f"network gives it {x.channels}.")
        self.pads = m.pads(x.spatial)
        out = m.output_size(x.spatial)
        if min(out) < 1:
            raise ValueError(f"{self.label}: the input's spatial shape {x.spatial} is smaller "
                             f"than the kernel {m.kernel_size} (dilation {m.dilation}).")
        return Shape(channels=m.out_channels, spatial=out)

    def apply(self, inputs, orients, out, side1=None, side2=None) -> Pair:
        (x,), (o,) = inputs, orients
        m = self.module
        mean = (lambda v: window_mean(v, o, m.kernel_size, m.stride, m.dilation, self.pads,
                                      diagonal_window=True))
        return _affine(mean(x.nngp), None if x.ntk is None else mean(x.ntk), self.w2, self.b2,
                       out.ntk)

    def input_window(self, x1: Tensor, x2: Tensor, out: Orientation,
                     buffer: Optional[Tensor] = None) -> Tensor:
        """The window mean of the network input's kernel (``Input``), from the inputs' patches.

        Equal to ``window_mean`` of the input's pair tensor, but one batched product over the
        ``C · prod(kernel)`` entries of each window instead of an outer product over position
        pairs and sums over offsets. x1 (B1, C, *S), x2 (B2, C, *S) -> (B1, B2 (1 when
        ``out.aligned``), *S_out[, *S_out]) in ``out``'s layout; written into the start of
        ``buffer`` (1-D, the dtype and device of x1) when it is given and large enough.
        """
        a, b = self._patches(x1), self._patches(x2)        # (B, F, P_out)
        a = a * (1.0 / a.shape[1])
        n1, n2, s = a.shape[0], b.shape[0], tuple(out.spatial)
        if out.aligned:
            if out.full:
                return torch.bmm(a.transpose(1, 2), b).reshape((n1, 1) + s + s)
            return torch.einsum("bfp,bfp->bp", a, b).reshape((n1, 1) + s)
        if not out.full:
            k = torch.bmm(a.permute(2, 0, 1), b.permute(2, 1, 0))     # (P, B1, B2)
            return k.permute(1, 2, 0).reshape((n1, n2) + s)
        p = a.shape[2]
        shape = (n1, n2, p, p)
        target = None
        if buffer is not None and buffer.numel() >= math.prod(shape):
            target = buffer[:math.prod(shape)].view(shape)
        k = torch.matmul(a.transpose(1, 2).unsqueeze(1), b.unsqueeze(0), out=target)
        return k.reshape((n1, n2) + s + s)

    def _patches(self, x: Tensor) -> Tensor:
        """(B, C, *S) -> (B, C · prod(kernel), P_out): each output position's window of the
        zero-padded input."""
        m = self.module
        widths = [w for lo_hi in reversed(self.pads) for w in lo_hi]
        v = F.pad(x, widths) if any(widths) else x
        out = m.output_size(tuple(x.shape[2:]))
        taps = []
        for offset in itertools.product(*(range(k) for k in m.kernel_size)):
            index = [slice(None), slice(None)]
            for j, s, d, o in zip(offset, m.stride, m.dilation, out):
                index.append(slice(j * d, j * d + s * (o - 1) + 1, s))
            taps.append(v[tuple(index)])
        return torch.stack(taps, 2).reshape(x.shape[0], -1, math.prod(out))


def window_mean(v: Tensor, orient: Orientation, kernel: Tuple[int, ...],
                stride: Tuple[int, ...], dilation: Tuple[int, ...],
                pads: Tuple[Tuple[int, int], ...], *, diagonal_window: bool) -> Tensor:
    """Mean over window offsets of a pair tensor, axis by axis (strided slices of the
    zero-padded tensor, one addition per offset).

    ``diagonal_window``: the same offset d on both sides (a convolution,
    ``v[s·t + d, s·t' + d]``); otherwise every pair of offsets (d, e) (average pooling, where
    the two sides are summed one after the other). The diagonal layout has only the first kind.
    """
    d = len(orient.spatial)
    for axis in range(d):
        k, s, dil, (lo, hi) = kernel[axis], stride[axis], dilation[axis], pads[axis]
        dims = (2 + axis, 2 + d + axis) if orient.full else (2 + axis,)
        size = v.shape[dims[0]] + lo + hi
        out = (size - dil * (k - 1) - 1) // s + 1
        if lo or hi:
            widths = [0] * (2 * v.dim())
            for dim in dims:
                widths[2 * (v.dim() - 1 - dim)] = lo
                widths[2 * (v.dim() - 1 - dim) + 1] = hi
            v = F.pad(v, widths)

        def taps(t: Tensor, dim_set) -> Tensor:
            acc = None
            for j in range(k):
                index = [slice(None)] * t.dim()
                for dim in dim_set:
                    index[dim] = slice(j * dil, j * dil + s * (out - 1) + 1, s)
                piece = t[tuple(index)]
                acc = piece.clone() if acc is None else acc.add_(piece)
            return acc

        if diagonal_window:
            v = taps(v, dims).div_(k)
        else:
            for dim in dims:
                v = taps(v, (dim,))
            v = v.div_(k * k)
    return v


def _affine(k: Tensor, t, w2: float, b2: float, ntk: bool, owned: bool = False) -> Pair:
    """``K' = w² K + b²``, ``Θ' = w² Θ + K'`` (Θ ``None`` is zero; not computed without
    ``ntk``); ``owned``: k and t may be overwritten."""
    if b2:   # one pass each: b² + w² K, K' + w² Θ
        bias = _constant(b2, k)
        k = torch.add(bias, k, alpha=w2, out=k) if owned else torch.add(bias, k, alpha=w2)
    else:
        k = k.mul_(w2) if owned else k * w2
    if not ntk:
        return Pair(k, None)
    if t is None:
        t = k.clone()
    else:
        t = torch.add(k, t, alpha=w2, out=t) if owned else torch.add(k, t, alpha=w2)
    return Pair(k, t)
