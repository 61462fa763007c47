"""NTK-parameterised fully-connected layers and networks."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class NTKLinear(nn.Module):
    """Affine layer ``z = weight_scale · x Wᵀ + bias_scale · b`` with W, b as plain parameters.

    The structured NTK method knows this layer: its share of the kernel is
    ``(weight_scale² · h·h' + bias_scale²) · (δ·δ')``.

    Args:
        in_features (int), out_features (int): sizes of x (..., in) and z (..., out).
        bias (bool): whether the layer has a bias.
        weight_scale (float), bias_scale (float): fixed multipliers applied in forward.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weight_scale: float = 1.0, bias_scale: float = 1.0,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight_scale, self.bias_scale = float(weight_scale), float(bias_scale)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Standard normal weights and biases (the NTK parameterisation)."""
        nn.init.normal_(self.weight)
        if self.bias is not None:
            nn.init.normal_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        z = nn.functional.linear(x, self.weight) * self.weight_scale
        if self.bias is not None:
            z = z + self.bias_scale * self.bias
        return z

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight_scale={self.weight_scale:.4g}, "
                f"bias_scale={self.bias_scale:.4g}")


class NTKMLP(nn.Module):  # replaced during this work
    pass
