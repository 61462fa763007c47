"""``nn.Linear`` (timm's subclass too), ``torch_ntk.NTKLinear`` and the ``Conv1D`` of Hugging
Face's GPT models:
``z = α W h + β b``.

Called once per sample on an ``(N, p)`` input, the layer's share is the Gram product
``(α² h·h' + β²) (δ_a·δ'_b)``: ``p + K² q`` multiply-adds per pair of samples and no
per-sample gradient. Over extra axes (a sequence ``(N, T, p)``, batch on any axis) or called
several times, it contributes the per-sample gradients ``Σ_t α δ_t h_tᵀ`` and ``Σ_t β δ_t``.

``transformers``' ``Conv1D`` (GPT-2, GPT, ...) is the same layer with the weight stored
transposed, ``(p, q)``: ``z = h W + b``. Its per-sample gradients are laid out as its weight,
its Gram entries as every other linear layer's (``transposed`` tells which).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from torch_ntk.empirical.rules.base import Call, Layer, Rule
from torch_ntk.infinite.ntkmlp import NTKLinear


class LinearRule(Rule):
    name = "linear"

    def matches(self, module: nn.Module) -> bool:
        plain = isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
        ntk = isinstance(module, NTKLinear) and type(module).forward is NTKLinear.forward
        timm = (isinstance(module, nn.Linear) and type(module).__name__ == "Linear"
                and type(module).__module__.startswith("timm."))   # F.linear, as nn.Linear
        return ((plain or ntk or timm or _is_conv1d(module)) and "weight" in module._parameters
                and not parametrize.is_parametrized(module)
                and not _has_hooks(module))

    def accepts(self, layer: Layer, calls: list[Call]) -> bool:
        for call in calls:
            if len(call.inputs()) != 1 or len(call.outputs) != 1:
                return False
            h, bd = call.inputs()[0], call.in_dims[0]
            if bd is None or bd == h.dim() - 1 or call.out_dims[0] != bd:
                return False
        layer.state["positions"] = sum(
            math.prod(s for i, s in enumerate(c.inputs()[0].shape[:-1]) if i != c.in_dims[0])
            for c in calls)
        layer.state["batch_first_2d"] = all(c.in_dims[0] == 0 and c.inputs()[0].dim() == 2
                                            for c in calls)
        return True

    def uses_gram(self, layer: Layer) -> bool:
        return layer.calls == 1 and layer.state.get("batch_first_2d", False)

    def gram_factors(self, layer: Layer, call: Call, delta: list[Tensor]
                     ) -> list[tuple[Tensor, Tensor, float]]:
        alpha, beta = _scales(layer.module)
        h = call.inputs()[0]
        if "weight" not in layer.params:
            h = h.new_empty(h.shape[0], 0)
        elif alpha != 1.0:
            h = h * alpha
        c = beta ** 2 if "bias" in layer.params else 0.0
        return [(h.contiguous(), delta[0].transpose(0, 1), c)]  # the op copies d if needed

    def gram_direction(self, layer: Layer, r: dict[str, Tensor]
                       ) -> tuple[Tensor, Tensor | None]:
        q, _ = _out_in(layer.module)
        if "weight" not in layer.params:
            return layer.module.weight.new_empty(q, 0), r.get("bias")
        weight = r["weight"].T if _is_conv1d(layer.module) else r["weight"]
        return weight, r.get("bias")

    def transposed(self, layer: Layer) -> bool:
        return _is_conv1d(layer.module)

    def position_factors(self, layer: Layer, calls: list[Call], deltas: list[list[Tensor]]
                         ) -> list[tuple[Tensor, Tensor, float]]:
        alpha, beta = _scales(layer.module)
        c = beta ** 2 if "bias" in layer.params else 0.0
        entries = []
        for call, delta in zip(calls, deltas):
            bd = call.in_dims[0]
            h = call.inputs()[0].movedim(bd, 0)
            n, p = h.shape[0], h.shape[-1]
            h = h.reshape(n, -1, p) * alpha if "weight" in layer.params else h.new_empty(n, 1, 0)
            d = delta[0].movedim(bd + 1, 1)
            d = d.reshape(d.shape[0], n, -1, d.shape[-1])               # (K, n, T, q)
            for t in range(d.shape[2]):
                h_t = h[:, t] if h.shape[2] else h[:, 0]
                entries.append((h_t.contiguous(), d[:, :, t].transpose(0, 1), c))
        return entries

    def position_bytes(self, layer: Layer, k: int) -> int:
        q, p = _out_in(layer.module)
        return layer.state.get("positions", 1) * (p + k * q) * layer.module.weight.element_size()

    def per_sample_gradients(self, layer: Layer, calls: list[Call],
                             deltas: list[list[Tensor]]) -> Tensor:
        alpha, beta = _scales(layer.module)
        stored_t = _is_conv1d(layer.module)
        g_w = g_b = None
        for call, delta in zip(calls, deltas):
            bd = call.in_dims[0]
            h = call.inputs()[0].movedim(bd, 0)
            d = delta[0].movedim(bd + 1, 1)                     # (K, n, ..., q)
            n, k, q = h.shape[0], d.shape[0], d.shape[-1]
            h_t, d_t = h.reshape(n, -1, h.shape[-1]), d.reshape(k, n, -1, q)
            if "weight" in layer.params:
                d_n = d_t.transpose(0, 1)                         # (n, K, T, q)
                w = (torch.matmul(h_t.transpose(1, 2).unsqueeze(1), d_n) if stored_t
                     else torch.matmul(d_n.transpose(2, 3), h_t.unsqueeze(1)))
                w = w.reshape(n, k, -1)     # batched GEMMs: (n, K, p, q) / (n, K, q, p)
                w = w if alpha == 1.0 else w * alpha
                g_w = w if g_w is None else g_w + w
            if "bias" in layer.params:
                b = d_t.sum(2).transpose(0, 1) * beta
                g_b = b if g_b is None else g_b + b
        return [g for g in (g_w, g_b) if g is not None]

    def cost(self, layer: Layer, k: int) -> tuple[float, float]:
        q, p = _out_in(layer.module)
        item = layer.module.weight.element_size()
        if self.uses_gram(layer):
            return float(p + k * k * q), float((p + k * q) * item)
        size = sum(t.numel() for t in layer.params.values())
        positions = layer.state.get("positions", 1)
        return float(k * k * size), float((k * size + positions * (p + k * q)) * item)


# Internal helpers

def _has_hooks(module: nn.Module) -> bool:
    """Forward hooks may change what the layer computes: then the catch-all rule handles it."""
    from torch.nn.modules import module as base
    return bool(module._forward_pre_hooks or module._forward_hooks
                or base._global_forward_pre_hooks or base._global_forward_hooks)


def _is_conv1d(module: nn.Module) -> bool:
    """``transformers.pytorch_utils.Conv1D`` (matched by name: transformers is optional), its
    own forward, weight ``(nx, nf)``."""
    cls = type(module)
    w = module._parameters.get("weight")
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")
            and "forward" in cls.__dict__ and w is not None and w.dim() == 2
            and tuple(w.shape) == (getattr(module, "nx", None), getattr(module, "nf", None)))


def _out_in(module: nn.Module) -> tuple[int, int]:
    """(q, p): the layer's output and input widths."""
    q, p = module.weight.shape
    return (p, q) if _is_conv1d(module) else (q, p)


def _scales(module: nn.Module) -> tuple[float, float]:
    if isinstance(module, NTKLinear):
        return module.weight_scale, module.bias_scale
    return 1.0, 1.0
