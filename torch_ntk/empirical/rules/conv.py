"""``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d`` with zero padding (any stride, dilation, groups,
padding), and ``torch_ntk.NTKConv1d/2d`` (``z = α conv(W, h) + β b``).

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
from torch_ntk.infinite.layers import _NTKConvNd


class ConvRule(Rule):
    name = "conv"

    def matches(self, module: nn.Module) -> bool:
        plain = type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and module.padding_mode == "zeros"
        ntk = isinstance(module, _NTKConvNd) and type(module).forward is _NTKConvNd.forward
        return (plain or ntk) and "weight" in module._parameters and not _has_hooks(module)

    def accepts(self, layer: Layer, calls: list[Call]) -> bool:
        dims = len(layer.module.kernel_size) + 2
        if not all(len(c.inputs()) == 1 and c.inputs()[0].dim() == dims and c.in_dims == [0]
                   and c.out_dims == [0] for c in calls):
            return False
        module, k = layer.module, layer.state.get("k", 1)
        q, p = module.weight.shape[0], module.weight[0].numel()
        t = calls[0].outputs[0][0, 0].numel()
        # Multiply-adds per pair of samples: per-sample gradients contract K² p q; pairs of
        # positions contract T² Grams of the patches and of δ.
        layer.state["positions"] = t
        layer.state["position_pairs"] = (len(calls) == 1 and module.groups == 1
                                         and t * t * (p + k * k * q) < k * k * p * q)
        return True

    def uses_gram(self, layer: Layer) -> bool:
        return layer.state.get("position_pairs", False)

    def gram_factors(self, layer: Layer, call: Call, delta: list[Tensor]
                     ) -> list[tuple[Tensor, Tensor, float]]:
        """One entry per output position t: (patch_t, δ_t, [bias]); paired over (t, t')."""
        module = layer.module
        spatial = len(module.kernel_size)
        alpha, beta = _scales(module)
        view = _patch_view(module, call.inputs()[0])             # (n, C_in, *out, *kernel)
        n = view.shape[0]
        order = ((0,) + tuple(range(2, 2 + spatial)) + (1,)
                 + tuple(range(2 + spatial, 2 + 2 * spatial)))
        patches = view.permute(order).reshape(n, -1, _patch_size(module))   # (n, T, p)
        k, _, q = delta[0].shape[:3]
        d = delta[0].reshape(k, n, q, -1).permute(3, 1, 0, 2)    # (T, n, K, q)
        c = beta ** 2 if "bias" in layer.params else 0.0
        if alpha != 1.0:
            patches = patches * alpha
        entries = []
        for t in range(d.shape[0]):
            h = patches[:, t] if "weight" in layer.params else patches.new_empty(n, 0)
            entries.append((h.contiguous(), d[t].contiguous(), c))
        return entries

    def position_factors(self, layer: Layer, calls: list[Call], deltas: list[list[Tensor]]
                         ) -> list[tuple[Tensor, Tensor, float]] | None:
        if layer.module.groups != 1:   # a grouped weight is no outer product over channels
            return None
        return [e for call, delta in zip(calls, deltas)
                for e in self.gram_factors(layer, call, delta)]

    def position_bytes(self, layer: Layer, k: int) -> int | None:
        if layer.module.groups != 1:
            return None
        q, p = layer.module.weight.shape[0], layer.module.weight[0].numel()
        t = layer.state.get("positions", 1) * layer.calls
        return t * (p + k * q) * layer.module.weight.element_size()

    def gram_direction(self, layer: Layer, r: dict[str, Tensor]
                       ) -> tuple[Tensor, Tensor | None]:
        w = layer.module.weight
        weight = (r["weight"].reshape(w.shape[0], -1) if "weight" in layer.params
                  else w.new_empty(w.shape[0], 0))
        return weight, r.get("bias")

    def cost(self, layer: Layer, k: int) -> tuple[float, float]:
        q, p = layer.module.weight.shape[0], layer.module.weight[0].numel()
        t = layer.state.get("positions", 1)
        item = layer.module.weight.element_size()
        if self.uses_gram(layer):
            return float(t * t * (p + k * k * q)), float(t * (p + k * q) * item)
        return float(k * k * p * q), float(k * (p * q + q) * item)

    def per_sample_gradients(self, layer: Layer, calls: list[Call],
                             deltas: list[list[Tensor]]) -> Tensor:
        module = layer.module
        groups, spatial = module.groups, len(module.kernel_size)
        alpha, beta = _scales(module)
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
                if alpha != 1.0:
                    w = w * alpha
                g_w = w.reshape(n, k, -1) if g_w is None else g_w + w.reshape(n, k, -1)
            if "bias" in layer.params:
                b = delta[0].reshape(k, n, c_out, -1).sum(3).transpose(0, 1)
                if beta != 1.0:
                    b = b * beta
                g_b = b if g_b is None else g_b + b
        return torch.cat([g for g in (g_w, g_b) if g is not None], dim=2)


# Internal helpers

def _patch_view(module: nn.Module, h: Tensor) -> Tensor:
    """Input patches of one call as a strided view (n, C_in, *out_positions, *kernel).

    Padding makes one padded copy of the input; the patches themselves are not copied.
    """
    h = F.pad(h, _padding(module, tuple(h.shape[2:])))
    for i, (size, stride, dilation) in enumerate(zip(module.kernel_size, module.stride,
                                                     module.dilation)):
        h = h.unfold(2 + i, dilation * (size - 1) + 1, stride)
        if dilation > 1:
            h = h[..., ::dilation]
    return h


def _patch_size(module: nn.Module) -> int:
    """Entries of one input patch: C_in · prod(kernel)."""
    return module.weight[0].numel()


def _scales(module: nn.Module) -> tuple[float, float]:
    if isinstance(module, _NTKConvNd):
        return module.weight_scale, module.bias_scale
    return 1.0, 1.0


def _padding(module: nn.Module, spatial: tuple[int, ...]) -> list[int]:
    """F.pad amounts (last dimension first) equal to the module's padding for an input of
    spatial size ``spatial``."""
    if isinstance(module, _NTKConvNd):
        return [p for pair in reversed(module.pads(spatial)) for p in pair]
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
