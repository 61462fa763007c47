"""NTK-parameterised fully-connected layers and networks."""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from torch_ntk.infinite.checks import _check_int, _check_std, resolve_activation

PARAMETERIZATIONS = ("ntk", "standard")


class NTKLinear(nn.Module):
    """Affine layer ``z = weight_scale · x Wᵀ + bias_scale · b`` with W, b as plain parameters.

    Give either the scales themselves or, for the NTK parameterisation, ``w_std`` and
    ``b_std``: then ``weight_scale = w_std / sqrt(in_features)``, ``bias_scale = b_std`` and
    ``b_std == 0`` (the default when only ``w_std`` is given) means no bias parameter. W and b
    are drawn from N(0, 1). The structured NTK method knows this layer (its share of the kernel
    is ``(weight_scale² · h·h' + bias_scale²) · (δ·δ')``) and so does ``analytic_ntk(model, x)``.

    Args:
        in_features (int), out_features (int): sizes of x (..., in) and z (..., out).
        bias (bool): whether the layer has a bias (with ``b_std``: and ``b_std > 0``).
        weight_scale (float), bias_scale (float): fixed multipliers applied in forward
            (default 1 and 1).
        w_std (float), b_std (float): the NTK parameterisation's standard deviations, instead
            of the scales.
    Raises:
        ValueError: both pairs given, negative or non-finite values.
    Example:
        >>> layer = torch_ntk.NTKLinear(64, 10, w_std=1.4, b_std=0.1)   # weight_scale 1.4/8
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weight_scale: Optional[float] = None, bias_scale: Optional[float] = None,
                 w_std: Optional[float] = None, b_std: Optional[float] = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        _check_int("NTKLinear", "in_features", in_features, 1, "a layer size")
        _check_int("NTKLinear", "out_features", out_features, 1, "a layer size")
        if (w_std is not None or b_std is not None) and (weight_scale is not None
                                                         or bias_scale is not None):
            raise ValueError("NTKLinear: give weight_scale/bias_scale or w_std/b_std, not both; "
                             "w_std=s is weight_scale=s/sqrt(in_features), b_std is bias_scale.")
        if w_std is not None or b_std is not None:
            w_std = 1.0 if w_std is None else w_std
            b_std = 0.0 if b_std is None else b_std
            _check_std("NTKLinear", "w_std", w_std)
            _check_std("NTKLinear", "b_std", b_std)
            weight_scale, bias_scale = float(w_std) / math.sqrt(in_features), float(b_std)
            bias = bool(bias) and bias_scale > 0
        weight_scale = 1.0 if weight_scale is None else weight_scale
        bias_scale = 1.0 if bias_scale is None else bias_scale
        _check_std("NTKLinear", "weight_scale", weight_scale)
        _check_std("NTKLinear", "bias_scale", bias_scale)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight_scale, self.bias_scale = float(weight_scale), float(bias_scale)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    @property
    def w_std(self) -> float:
        """``weight_scale · sqrt(in_features)``."""
        return self.weight_scale * math.sqrt(self.in_features)

    @property
    def b_std(self) -> float:
        """``bias_scale``, or 0 without a bias."""
        return self.bias_scale if self.bias is not None else 0.0

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


class NTKMLP(nn.Module):
    """Fully-connected network whose infinite-width NTK is ``analytic_ntk``.

    ``depth`` affine layers ``in_features -> width -> ... -> width -> out_features`` (``depth=1``
    is a single affine map ``in_features -> out_features``), the activation after every affine
    layer but the last.

    ``parameterization="ntk"`` (default) uses ``NTKLinear`` layers
    ``z = w_std / sqrt(fan_in) · W h + b_std · b`` with ``W, b ~ N(0, 1)``, exactly the network
    of ``analytic_ntk``: ``empirical_ntk(model, x, mode="trace") / out_features`` converges to
    ``analytic_ntk(x, depth=depth, activation=..., w_std=..., b_std=...)`` with an error
    shrinking like ``width ** -0.5``. With ``b_std == 0`` the layers have no bias (a bias scaled
    by 0 would never move nor contribute).

    ``parameterization="standard"`` uses ``nn.Linear`` layers with ``W ~ N(0, w_std² / fan_in)``
    and ``b ~ N(0, b_std²)``; the bias is always present and trainable (initialised to zero when
    ``b_std == 0``). The output has the same distribution at initialisation, so the NNGP limit is
    the same, but the NTK differs: each weight's share is multiplied by ``fan_in / w_std²`` (so
    it grows with the width) and each bias's share is 1 instead of ``b_std²``.

    Args:
        in_features (int): input size n0; inputs are Tensor[..., in_features].
        width (int): hidden size (unused when ``depth == 1``).
        depth (int): number of affine layers L ≥ 1.
        out_features (int): output size K; outputs are Tensor[..., out_features].
        activation (str or callable): a name accepted by ``analytic_ntk`` (``"relu"``,
            ``"erf"``, ``"identity"``, ``"tanh"``, ``"gelu"``, ``"sigmoid"``, ``"softplus"``)
            or an elementwise callable.
        w_std (float), b_std (float): weight and bias standard deviations (≥ 0).
        parameterization (str): ``"ntk"`` or ``"standard"``.
        device, dtype: where and how the parameters are created.
    Raises:
        ValueError: non-positive sizes, unknown activation name or parameterization, negative
            or non-finite ``w_std``/``b_std``. TypeError: sizes that are not ints, an
            activation that is neither a known name nor callable.
    Example:
        >>> torch.manual_seed(0)
        >>> net = torch_ntk.NTKMLP(3, 512, depth=3, activation="relu")
        >>> x = torch.randn(4, 3)
        >>> net(x).shape
        torch.Size([4, 1])
        >>> torch_ntk.empirical_ntk(net, x, mode="trace").shape  # ≈ analytic_ntk(x, depth=3)
        torch.Size([4, 4])
    """

    def __init__(self, in_features: int, width: int, depth: int, out_features: int = 1, *,
                 activation: Union[str, Callable[[Tensor], Tensor]] = "relu",
                 w_std: float = 1.0, b_std: float = 0.0, parameterization: str = "ntk",
                 device=None, dtype=None) -> None:
        super().__init__()
        for arg, val in (("in_features", in_features), ("width", width), ("depth", depth),
                         ("out_features", out_features)):
            _check_int("NTKMLP", arg, val, 1, "a layer size" if arg != "depth"
                       else "the number of affine layers")
        _check_std("NTKMLP", "w_std", w_std)
        _check_std("NTKMLP", "b_std", b_std)
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"NTKMLP: parameterization must be one of {PARAMETERIZATIONS}, "
                             f"got {parameterization!r}.")
        self.activation_name, self.activation = resolve_activation(activation, caller="NTKMLP")
        in_features, width, depth, out_features = (int(v) for v in (in_features, width, depth,
                                                                   out_features))
        self.in_features, self.width, self.depth = in_features, width, depth
        self.out_features, self.parameterization = out_features, parameterization
        self.w_std, self.b_std = float(w_std), float(b_std)
        sizes = [in_features] + [width] * (depth - 1) + [out_features]
        factory = {"device": device, "dtype": dtype}
        layers = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            if parameterization == "ntk":
                layers.append(NTKLinear(fan_in, fan_out, bias=self.b_std > 0,
                                        weight_scale=self.w_std / math.sqrt(fan_in),
                                        bias_scale=self.b_std, **factory))
            else:
                layers.append(nn.Linear(fan_in, fan_out, **factory))
        self.layers = nn.ModuleList(layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draws all parameters afresh, layer by layer (weight, then bias)."""
        with torch.no_grad():
            for layer in self.layers:
                if isinstance(layer, NTKLinear):
                    layer.reset_parameters()
                else:
                    layer.weight.normal_(0.0, self.w_std / math.sqrt(layer.in_features))
                    if self.b_std > 0:
                        layer.bias.normal_(0.0, self.b_std)
                    else:
                        layer.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """Tensor[..., in_features] -> Tensor[..., out_features]."""
        for i, layer in enumerate(self.layers):
            if i:
                x = self.activation(x)
            x = layer(x)
        return x

    def extra_repr(self) -> str:
        act = self.activation_name or getattr(self.activation, "__name__", repr(self.activation))
        return (f"activation={act}, w_std={self.w_std:.4g}, b_std={self.b_std:.4g}, "
                f"parameterization={self.parameterization!r}")
