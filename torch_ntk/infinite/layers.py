"""NTK-parameterised convolutions and the erf activation as modules.

``NTKConv1d`` / ``NTKConv2d`` compute ``z = w_std / sqrt(fan_in) · conv(W, h) + b_std · b`` with
``W, b ~ N(0, 1)`` and ``fan_in = in_channels · prod(kernel_size)``, zero padding. As the
channels of every layer but the last grow, the network's NNGP and NTK tend to
``analytic_ntk(model, x)``.
"""
from __future__ import annotations

import math
from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_ntk.infinite.checks import _check_int, _check_std

Size = Union[int, Tuple[int, ...]]
PADDINGS = ("same", "valid")


class _NTKConvNd(nn.Module):
    """The convolution of ``NTKConv1d`` and ``NTKConv2d`` (``dims`` spatial axes)."""

    dims = 0

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Size, stride: Size = 1,
                 padding: Union[str, Size] = 0, dilation: Size = 1, *, w_std: float = 1.0,
                 b_std: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        name = type(self).__name__
        _check_int(name, "in_channels", in_channels, 1, "a channel count")
        _check_int(name, "out_channels", out_channels, 1, "a channel count")
        _check_std(name, "w_std", w_std)
        _check_std(name, "b_std", b_std)
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _tuple(name, "kernel_size", kernel_size, self.dims, 1)
        self.stride = _tuple(name, "stride", stride, self.dims, 1)
        self.dilation = _tuple(name, "dilation", dilation, self.dims, 1)
        if isinstance(padding, str):
            if padding not in PADDINGS:
                raise ValueError(f"{name}: padding must be an int, a tuple of ints, 'same' or "
                                 f"'valid', got {padding!r}.")
            self.padding: Union[str, Tuple[int, ...]] = padding
        else:
            self.padding = _tuple(name, "padding", padding, self.dims, 0)
        self.w_std, self.b_std = float(w_std), float(b_std)
        fan_in = self.in_channels * math.prod(self.kernel_size)
        self.weight_scale, self.bias_scale = self.w_std / math.sqrt(fan_in), self.b_std
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size,
                                               **factory))
        self.bias = (nn.Parameter(torch.empty(out_channels, **factory)) if self.b_std > 0
                     else None)
        self.groups, self.padding_mode = 1, "zeros"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Standard normal weights and biases (the NTK parameterisation)."""
        nn.init.normal_(self.weight)
        if self.bias is not None:
            nn.init.normal_(self.bias)

    def pads(self, spatial: Tuple[int, ...]) -> Tuple[Tuple[int, int], ...]:
        """Zero padding ``(before, after)`` per spatial axis for an input of that size.

        ``"same"`` gives ``ceil(size / stride)`` outputs, the extra entry after (as JAX and
        neural-tangents pad); ``"valid"`` none.
        """
        if self.padding == "valid":
            return tuple((0, 0) for _ in spatial)
        if self.padding == "same":
            out = []
            for size, k, s, d in zip(spatial, self.kernel_size, self.stride, self.dilation):
                total = max((-(-size // s) - 1) * s + d * (k - 1) + 1 - size, 0)
                out.append((total // 2, total - total // 2))
            return tuple(out)
        return tuple((p, p) for p in self.padding)

    def output_size(self, spatial: Tuple[int, ...]) -> Tuple[int, ...]:
        """Output positions per axis for an input of spatial size ``spatial``."""
        return tuple((size + lo + hi - d * (k - 1) - 1) // s + 1
                     for size, (lo, hi), k, s, d in zip(spatial, self.pads(spatial),
                                                        self.kernel_size, self.stride,
                                                        self.dilation))

    def forward(self, x: Tensor) -> Tensor:
        """Tensor[N, in_channels, *spatial] -> Tensor[N, out_channels, *out_spatial]."""
        if x.dim() != self.dims + 2:
            raise ValueError(f"{type(self).__name__}: expected an input of shape (N, C, "
                             f"{', '.join('LHW'[-self.dims:] if self.dims == 1 else 'HW')}), "
                             f"got {tuple(x.shape)}.")
        pads = self.pads(tuple(x.shape[2:]))
        if any(lo or hi for lo, hi in pads):
            x = F.pad(x, [p for pair in reversed(pads) for p in pair])
        conv = F.conv1d if self.dims == 1 else F.conv2d
        z = conv(x, self.weight, None, self.stride, 0, self.dilation) * self.weight_scale
        if self.bias is not None:
            z = z + (self.bias_scale * self.bias).reshape(-1, *([1] * self.dims))
        return z

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding!r}, dilation={self.dilation}, "
                f"w_std={self.w_std:.4g}, b_std={self.b_std:.4g}")


class NTKConv1d(_NTKConvNd):
    """NTK-parameterised 1-D convolution: Tensor[N, C_in, L] -> Tensor[N, C_out, L_out].

    Args:
        in_channels (int), out_channels (int): channels of the input and the output.
        kernel_size (int or tuple), stride (int or tuple), dilation (int or tuple): as
            ``nn.Conv1d``.
        padding (int, tuple, "same" or "valid"): zero padding; ``"same"`` keeps
            ``ceil(L / stride)`` positions (any stride).
        w_std (float), b_std (float): ``z = w_std / sqrt(C_in · k) · conv(W, h) + b_std · b``;
            ``b_std == 0`` means no bias parameter.
    Example:
        >>> conv = torch_ntk.NTKConv1d(3, 64, 5, padding="same", w_std=1.4)
        >>> conv(torch.randn(2, 3, 20)).shape
        torch.Size([2, 64, 20])
    """

    dims = 1


class NTKConv2d(_NTKConvNd):
    """NTK-parameterised 2-D convolution: Tensor[N, C_in, H, W] -> Tensor[N, C_out, H', W'].

    Args: as ``NTKConv1d``, with 2-D sizes (an int or a pair); ``fan_in = C_in · kh · kw``.
    Example:
        >>> conv = torch_ntk.NTKConv2d(1, 32, 3, padding="same")
        >>> conv(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 32, 8, 8])
    """

    dims = 2


class Erf(nn.Module):
    """The elementwise error function ``torch.erf`` as a module (any shape)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.erf(x)


def _tuple(caller: str, arg: str, val, dims: int, low: int) -> Tuple[int, ...]:
    vals = (val,) * dims if not isinstance(val, (tuple, list)) else tuple(val)
    if len(vals) != dims:
        raise ValueError(f"{caller}: {arg} must be an int or a tuple of {dims} ints, got {val!r}.")
    for v in vals:
        _check_int(caller, arg, v, low, f"an int ≥ {low} or a tuple of {dims}")
    return tuple(int(v) for v in vals)
