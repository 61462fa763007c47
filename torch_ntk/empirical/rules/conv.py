"""``nn.Conv1d`` and ``nn.Conv2d`` with zero padding (any stride, dilation, groups, padding).

The per-sample weight gradient of a call is ``Σ_t δ_t patch_tᵀ`` over the output positions t,
with the input patches unfolded once per call (``F.unfold``): one batched matrix product per
call instead of a vector-Jacobian product per sample and output. The bias gradient is
``Σ_t δ_t``. Other convolutions (3-d, transposed, circular or reflect padding) are left to the
catch-all rule.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_ntk.empirical.rules.base import Call, Layer, Rule
from torch_ntk.empirical.rules.linear import _has_hooks


class ConvRule(Rule):
    name = "conv"

    def matches(self, module: nn.Module) -> bool:
        return (type(module) in (nn.Conv1d, nn.Conv2d) and module.padding_mode == "zeros"
                and "weight" in module._parameters and not _has_hooks(module))

    def accepts(self, layer: Layer, calls: list[Call]) -> bool:
        dims = len(layer.module.kernel_size) + 2
        return all(len(c.inputs()) == 1 and c.inputs()[0].dim() == dims and c.in_dims == [0]
                   and c.out_dims == [0] for c in calls)

    def per_sample_gradients(self, layer: Layer, calls: list[Call],
                             deltas: list[list[Tensor]]) -> Tensor:
        module = layer.module
        g_w = g_b = None
        for call, delta in zip(calls, deltas):
            patches = _patches(module, call.inputs()[0])               # (n, C_in·k, T)
            k, n, c_out = delta[0].shape[:3]
            d = delta[0].reshape(k, n, c_out, -1)                       # (K, n, C_out, T)
            if "weight" in layer.params:
                groups = module.groups
                d_g = d.reshape(k, n, groups, c_out // groups, d.shape[-1])
                p_g = patches.reshape(n, groups, -1, patches.shape[-1])
                w = torch.einsum("angot,ngpt->nagop", d_g, p_g).reshape(n, k, -1)
                g_w = w if g_w is None else g_w + w
            if "bias" in layer.params:
                b = d.sum(3).transpose(0, 1)
                g_b = b if g_b is None else g_b + b
        return torch.cat([g for g in (g_w, g_b) if g is not None], dim=2)


# Internal helpers

def _patches(module: nn.Module, h: Tensor) -> Tensor:
    """Unfolded input patches (n, C_in·kernel, T) of one call, padding included."""
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if isinstance(module, nn.Conv1d):
        h = h.unsqueeze(2)
        kernel, stride, dilation = (1, *kernel), (1, *stride), (1, *dilation)
        h = F.pad(h, _padding(module))
    else:
        h = F.pad(h, _padding(module))
    return F.unfold(h, kernel, dilation=dilation, stride=stride)


def _padding(module: nn.Module) -> list[int]:
    """F.pad amounts (last dimension first) equal to the module's padding."""
    pads: list[int] = []
    for i in reversed(range(len(module.kernel_size))):
        if module.padding == "valid":
            lo = hi = 0
        elif module.padding == "same":
            total = module.dilation[i] * (module.kernel_size[i] - 1)
            lo, hi = total // 2, total - total // 2
        else:
            lo = hi = module.padding[i]
        pads += [lo, hi]
    return pads
