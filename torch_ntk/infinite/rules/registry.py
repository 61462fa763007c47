"""Which rule reads which module or function: ``module_rules`` for ``nn.Module`` leaves of the
traced forward, ``function_rules`` for the functions and tensor methods between them. Each
returns the chain of rules the call applies in order, or ``None`` when it is not supported."""
from __future__ import annotations

import operator
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from torch_ntk.infinite.layers import Erf, _NTKConvNd
from torch_ntk.infinite.ntkmlp import NTKLinear, NTKMLP
from torch_ntk.infinite.rules.activations import ClosedForm, Hermite
from torch_ntk.infinite.rules.affine import Conv, Dense
from torch_ntk.infinite.rules.base import Rule
from torch_ntk.infinite.rules.norm import LayerNorm
from torch_ntk.infinite.rules.pooling import AvgPool, GlobalAvgPool
from torch_ntk.infinite.rules.structure import Add, Flatten, Identity, Scale

SUPPORTED = ("NTKLinear, NTKConv1d, NTKConv2d, NTKMLP (NTK parameterisation); nn.ReLU, "
             "nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.Softplus, nn.Identity, "
             "torch_ntk.Erf and their functional forms; nn.AvgPool1d/2d (padding 0), "
             "nn.AdaptiveAvgPool1d/2d(1) and their functional forms, x.mean(spatial axes), "
             "nn.Flatten, torch.flatten(x, 1), nn.LayerNorm without affine parameters over all "
             "non-batch axes, nn.Dropout, nn.Sequential, sums of branches (x + block(x)) and "
             "constant factors")

_HINTS = {nn.Linear: "use torch_ntk.NTKLinear(in, out, w_std=..., b_std=...)",
          nn.Conv1d: "use torch_ntk.NTKConv1d (the NTK parameterisation)",
          nn.Conv2d: "use torch_ntk.NTKConv2d (the NTK parameterisation)"}
_MONTE_CARLO = "torch_ntk.monte_carlo_ntk averages the empirical NTK of any module instead"


def activation_rule(fn: Any, label: str, degree: Optional[int] = None) -> Rule:
    """The rule of an elementwise activation given as a module or a callable."""
    extra = {} if degree is None else {"degree": degree}
    if isinstance(fn, nn.ReLU) or fn in (torch.relu, F.relu):
        return ClosedForm("relu")
    if isinstance(fn, nn.LeakyReLU):
        return ClosedForm("leaky_relu", fn.negative_slope)
    if isinstance(fn, Erf) or fn is torch.erf:
        return ClosedForm("erf")
    if isinstance(fn, nn.Identity):
        return ClosedForm("identity")
    if isinstance(fn, nn.Tanh) or fn is torch.tanh:
        return Hermite(torch.tanh, label, odd=True, **extra)
    if isinstance(fn, nn.GELU) and fn.approximate == "none":
        return Hermite(F.gelu, label, **extra)
    return Hermite(fn, label, **extra)


def module_rules(module: nn.Module, label: str) -> Optional[List[Rule]]:
    """The rules of a leaf module, ``None`` if unsupported (``unsupported`` says why)."""
    if type(module) is NTKLinear or (isinstance(module, NTKLinear)
                                     and type(module).forward is NTKLinear.forward):
        return [Dense(module.in_features, module.w_std, module.b_std, label,
                      module.out_features)]
    if isinstance(module, _NTKConvNd) and type(module).forward is _NTKConvNd.forward:
        return [Conv(module, label)]
    if isinstance(module, NTKMLP) and type(module).forward is NTKMLP.forward:
        if module.parameterization != "ntk":
            return None
        rules: List[Rule] = []
        for i, layer in enumerate(module.layers):
            if i:
                rules.append(activation_rule(module.activation, f"{label}.activation"))
            rules.append(Dense(layer.in_features, layer.w_std, layer.b_std,
                               f"{label}.layers.{i}", layer.out_features))
        return rules
    if isinstance(module, (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU,
                           nn.Softplus, Erf)):
        return [activation_rule(module, label)]
    if type(module) in (nn.Identity, nn.Dropout):
        return [Identity()]
    if type(module) in (nn.AvgPool1d, nn.AvgPool2d):
        dims = 1 if isinstance(module, nn.AvgPool1d) else 2
        pad = _ints(module.padding, dims)
        if any(pad) or module.ceil_mode:
            return None
        kernel = _ints(module.kernel_size, dims)
        stride = _ints(module.stride if module.stride is not None else module.kernel_size, dims)
        return [AvgPool(kernel, stride, label)]
    if type(module) in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d):
        dims = 1 if isinstance(module, nn.AdaptiveAvgPool1d) else 2
        if _ints(module.output_size, dims) != (1,) * dims:
            return None
        return [GlobalAvgPool(label, keep=True)]
    if type(module) is nn.Flatten:
        return [Flatten(label)] if module.start_dim == 1 and module.end_dim == -1 else None
    if type(module) is nn.LayerNorm:
        if module.elementwise_affine:
            return None
        return [LayerNorm(module.normalized_shape, module.eps, label)]
    return None


def unsupported(module: nn.Module, name: str) -> str:
    """The error message for the module at ``name`` that ``module_rules`` does not read."""
    kind = type(module).__name__
    why = ""
    if isinstance(module, NTKMLP):
        why = " (only parameterization='ntk' has an infinite-width NTK)"
    elif type(module) is nn.LayerNorm:
        why = " (with affine parameters; use elementwise_affine=False)"
    elif type(module) in (nn.AvgPool1d, nn.AvgPool2d):
        why = " (only padding=0 and ceil_mode=False)"
    elif type(module) in (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d):
        why = " (only output_size=1, global average pooling)"
    elif type(module) is nn.Flatten:
        why = " (only start_dim=1, end_dim=-1)"
    hint = _HINTS.get(type(module), _MONTE_CARLO)
    return (f"analytic_ntk: the module {name} ({kind}{why}) has no infinite-width rule; "
            f"{hint}. Supported: {SUPPORTED}.")


def function_rules(target: Any, args: Sequence[Any], kwargs: dict, label: str,
                   is_node: Callable[[Any], bool]) -> Optional[List[Rule]]:
    """The rules of a function or method call of the traced forward; ``is_node`` tells which
    arguments are values of the network (the rest are constants)."""
    nodes = [a for a in args if is_node(a)]
    consts = [a for a in args if not is_node(a)]
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    if target in (operator.add, torch.add) or name in ("add", "__add__", "__radd__"):
        if len(nodes) == 2 and not consts and not kwargs:
            return [Add(label)]
        return None
    if target in (operator.mul, torch.mul, operator.truediv, torch.div) or name in (
            "mul", "__mul__", "__rmul__", "div", "__truediv__"):
        if len(nodes) == 1 and len(consts) == 1 and not kwargs and _real(consts[0]):
            c = float(consts[0])
            if target in (operator.truediv, torch.div) or name in ("div", "__truediv__"):
                if args[0] is not nodes[0] or c == 0:
                    return None
                c = 1 / c
            return [Scale(c)]
        return None
    if len(nodes) != 1 or args[:1] != nodes[:1]:
        return None
    rest, kw = args[1:], dict(kwargs)
    if target in (torch.relu, F.relu) or name == "relu":
        return [ClosedForm("relu")] if not rest and not kw.get("inplace", False) else None
    if target is F.leaky_relu:
        slope = rest[0] if rest else kw.get("negative_slope", 0.01)
        return [ClosedForm("leaky_relu", slope)] if _real(slope) else None
    if target is torch.erf or name == "erf":
        return [ClosedForm("erf")] if not rest and not kw else None
    if target is torch.tanh or name == "tanh":
        return [Hermite(torch.tanh, label, odd=True)] if not rest and not kw else None
    if target in (torch.sigmoid, F.silu, F.softplus) or name == "sigmoid":
        fn = {"sigmoid": torch.sigmoid}.get(name, target)
        return [Hermite(lambda z: fn(z, *rest, **kw), label)]
    if target is F.gelu:
        approximate = kw.get("approximate", "none")
        return [Hermite(lambda z: F.gelu(z, approximate=approximate), label)]
    if target is F.dropout:
        return [Identity()]
    if target is torch.flatten or name == "flatten":
        start = rest[0] if rest else kw.get("start_dim", 0)
        end = rest[1] if len(rest) > 1 else kw.get("end_dim", -1)
        return [Flatten(label)] if (start, end) == (1, -1) else None
    if name in ("avg_pool1d", "avg_pool2d"):
        dims = int(name[-2])
        names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                 "divisor_override")
        a = dict(zip(names, rest), **kw)
        pad = _ints(a.get("padding", 0), dims)
        if (any(pad) or a.get("ceil_mode", False) or a.get("divisor_override") is not None
                or "kernel_size" not in a):
            return None
        kernel = _ints(a["kernel_size"], dims)
        stride = a.get("stride")
        stride = kernel if stride is None or stride == [] else _ints(stride, dims)
        return [AvgPool(kernel, stride, label)]
    if name in ("adaptive_avg_pool1d", "adaptive_avg_pool2d"):
        dims = int(name[-2])
        size = rest[0] if rest else kw.get("output_size")
        return [GlobalAvgPool(label, keep=True)] if _ints(size, dims) == (1,) * dims else None
    if name == "mean":
        dims = rest[0] if rest else kw.get("dim")
        keep = rest[1] if len(rest) > 1 else kw.get("keepdim", False)
        if dims is None:
            return None
        return [GlobalAvgPool(label, keep=bool(keep), dims=tuple(
            dims if isinstance(dims, (tuple, list)) else (dims,)))]
    return None


def _ints(v, dims: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims


def _real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
