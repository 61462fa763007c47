"""``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d`` with zero padding (any stride, dilation, groups, padding).

The per-sample weight gradient of a call is ``Σ_t δ_t patch_tᵀ`` over the output positions t,
with the input patches taken as a strided view of the padded input: one contraction per
call instead of a vector-Jacobian product per sample and output. The bias gradient is
``Σ_t δ_t``. Other convolutions (transposed, circular or reflect padding) are left to the
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
        return (type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and module.padding_mode == "zeros"
                and "weight" in module._parameters and not _has_hooks(module))

    def accepts(self, layer: Layer, calls: list[Call]) -> bool:
        dims = len(layer.module.kernel_size) + 2
        return all(len(c.inputs()) == 1 and c.inputs()[0].dim() == dims and c.in_dims == [0]
                   and c.out_dims == [0] for c in calls)

    def per_sample_gradients(self, layer: Layer, calls: list[Call],
                             deltas: list[list[Tensor]]) -> Tensor:
        module = layer.module
        groups, spatial = module.groups, len(module.kernel_size)
        g_w = g_b = None
        for call, delta in zip(calls, deltas):
            k, n, c_out = delta[0].shape[:3]
            if "weight" in layer.params:
                view = _patch_view(module, call.inputs()[0])   # (n, C_in, *out, *kernel)
                view = view.reshape(n, groups, -1, *view.shape[2:])
                d = delta[0].reshape(k, n, groups, c_out // groups, *delta[0].shape[3:])
                axes = "xyz"[:spatial]
                kern = "ijl"[:spatial]
                w = torch.einsum(f"ango{axes},ngc{axes}{kern}->nagoc{kern}", d, view)
                g_w = w.reshape(n, k, -1) if g_w is None else g_w + w.reshape(n, k, -1)
            if "bias" in layer.params:
                b = delta[0].reshape(k, n, c_out, -1).sum(3).transpose(0, 1)
                g_b = b if g_b is None else g_b + b
        return torch.cat([g for g in (g_w, g_b) if g is not None], dim=2)


# Internal helpers

def _patch_view(module: nn.Module, h: Tensor) -> Tensor:
    """Input patches of one call as a strided view (n, C_in, *out_positions, *kernel).

    Padding makes one padded copy of the input; the patches themselves are not copied.
    """
    h = F.pad(h, _padding(module))
    for i, (size, stride, dilation) in enumerate(zip(module.kernel_size, module.stride,
                                                     module.dilation)):
        h = h.unfold(2 + i, dilation * (size - 1) + 1, stride)
        if dilation > 1:
            h = h[..., ::dilation]
    return h


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
