"""Average pooling (``nn.AvgPool1d/2d`` with no padding) and global average pooling
(``nn.AdaptiveAvgPool1d/2d(1)``, ``x.mean(spatial axes)``): the kernel of a mean of positions
is the mean of the kernel over every pair of positions of the two windows, so both read the
full position-pair covariance."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from torch_ntk.infinite.rules.affine import window_mean
from torch_ntk.infinite.rules.base import Pair, Rule, Shape


class AvgPool(Rule):
    """``K'[t, t'] = mean_{d, e} K[s·t + d, s·t' + e]`` over the two windows."""

    name = "avg_pool"
    linear = True

    def __init__(self, kernel: Tuple[int, ...], stride: Tuple[int, ...], label: str) -> None:
        self.kernel, self.stride, self.label = kernel, stride, label

    def shape(self, inputs: Sequence[Shape]) -> Shape:
        (x,) = inputs
        if len(x.spatial) != len(self.kernel) or x.flat:
            raise ValueError(f"{self.label} needs an input with {len(self.kernel)} spatial "
                             f"axes, the network gives it spatial shape {x.spatial}.")
        out = tuple((n - k) // s + 1 for n, k, s in zip(x.spatial, self.kernel, self.stride))
        if min(out) < 1:
            raise ValueError(f"{self.label}: the window {self.kernel} is larger than the "
                             f"input's spatial shape {x.spatial}.")
        return Shape(channels=x.channels, spatial=out)

    def input_full(self, out_full: bool, index: int) -> bool:
        return True

    def apply(self, inputs, orients, out, side1=None, side2=None) -> Pair:
        (x,), (o,) = inputs, orients
        ones = (1,) * len(self.kernel)
        zero = ((0, 0),) * len(self.kernel)

        def pool(v):
            v = window_mean(v, o, self.kernel, self.stride, ones, zero, diagonal_window=False)
            return v if out.full else type(o)(True, out.spatial).diagonal(v)

        return Pair(pool(x.nngp), None if x.ntk is None else pool(x.ntk))


class GlobalAvgPool(Rule):
    """The mean over all pairs of positions; ``keep`` keeps size-1 spatial axes."""

    name = "global_avg_pool"
    linear = True

    def __init__(self, label: str, keep: bool, dims: Optional[Tuple[int, ...]] = None) -> None:
        self.label, self.keep, self.dims = label, keep, dims

    def shape(self, inputs: Sequence[Shape]) -> Shape:
        (x,) = inputs
        if not x.spatial or x.flat:
            raise ValueError(f"{self.label} needs a feature map with spatial axes, the "
                             f"network gives it {'a flattened value' if x.flat else 'features'}.")
        ndim = 2 + len(x.spatial)
        if self.dims is not None and sorted(d % ndim for d in self.dims) != list(range(2, ndim)):
            raise ValueError(f"{self.label}: a mean over the axes {self.dims} of a value of "
                             f"{ndim} axes; only the mean over all spatial axes "
                             f"{tuple(range(2, ndim))} (global average pooling) is supported.")
        return Shape(channels=x.channels, spatial=(1,) * len(x.spatial) if self.keep else ())

    def input_full(self, out_full: bool, index: int) -> bool:
        return True

    def apply(self, inputs, orients, out, side1=None, side2=None) -> Pair:
        (x,) = inputs
        dims = tuple(range(2, x.nngp.dim()))

        def mean(v):
            v = v.mean(dims)
            return v.reshape(v.shape + (1,) * len(out.spatial))

        return Pair(mean(x.nngp), None if x.ntk is None else mean(x.ntk))
