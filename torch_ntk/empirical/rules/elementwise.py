"""Layers whose parameters act entrywise or by lookup: norms and ``nn.Embedding``.

- LayerNorm ``z = x̂ ⊙ w + b`` (x̂ the normalised input): the per-sample gradients are
  ``Σ_t δ_t ⊙ x̂_t`` and ``Σ_t δ_t`` over the positions t outside the normalised shape.
- GroupNorm and eval-mode BatchNorm ``z = x̂ ⊙ w[c] + b[c]`` per channel c (axis 1): the same
  sums over the positions of each channel; x̂ uses the sample's own group statistics
  (GroupNorm) or the running statistics (BatchNorm in eval mode).
- timm's ``LayerNorm`` (the same as LayerNorm), ``LayerNorm2d`` (over the channels of an NCHW
  tensor: LayerNorm at every pixel) and ``BatchNormAct2d`` (eval-mode BatchNorm followed by its
  ``drop`` and ``act`` modules: δ is taken back through those to the BatchNorm's output by one
  batched vector-Jacobian product at the recorded input). Matched by class name and module,
  as timm is optional.
- Embedding ``z_t = E[token_t]``: its share is ``Σ_{t,t'} [tok_t = tok'_t'] δ_t · δ'_t'``, a
  sum over the pairs of positions holding the same token. Either as token entries (only the
  matching pairs, found by sorting: ``K² w`` per match) or, where that costs more, as per-sample
  gradients whose row r sums ``δ_t`` over the positions holding token r (a scatter-add,
  ``K² V w`` per pair). The number of matches is estimated on the probe.

Both avoid a vector-Jacobian product per sample and output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_ntk.empirical.rules.base import Call, Layer, Rule
from torch_ntk.empirical.rules.linear import _has_hooks


class LayerNormRule(Rule):
    name = "layernorm"

    def matches(self, module: nn.Module) -> bool:
        kind = (type(module) is nn.LayerNorm or _is_timm(module, "LayerNorm")
                or _is_timm(module, "LayerNorm2d"))
        return (kind and module.elementwise_affine
                and "weight" in module._parameters and not _has_hooks(module))

    def accepts(self, layer: Layer, calls: list[Call]) -> bool:
        if _is_timm(layer.module, "LayerNorm2d"):   # (N, C, H, W), normalised over C
            return all(len(c.inputs()) == 1 and c.in_dims == [0] and c.out_dims == [0]
                       and c.inputs()[0].dim() == 4 for c in calls)
        dims = len(layer.module.normalized_shape)
        return all(len(c.inputs()) == 1 and c.in_dims[0] is not None
                   and c.in_dims[0] < c.inputs()[0].dim() - dims for c in calls)

    def per_sample_gradients(self, layer: Layer, calls: list[Call],
                             deltas: list[list[Tensor]]) -> Tensor:
        module = layer.module
        channels_first = _is_timm(module, "LayerNorm2d")
        total = None
        for call, delta in zip(calls, deltas):
            x, bd = call.inputs()[0], call.in_dims[0]
            d = delta[0]
            if channels_first:                                    # as LayerNorm per pixel
                x, d = x.permute(0, 2, 3, 1), d.permute(0, 1, 3, 4, 2)
            width = module.weight.numel()
            d = d.movedim(bd + 1, 1)                              # (K, n, ..., *normalized)
            k, n = d.shape[:2]
            x_hat = lambda: F.layer_norm(  # noqa: E731
                x, module.normalized_shape, None, None, module.eps
            ).movedim(bd, 0).reshape(n, -1, width)
            g = _entrywise_gradients(layer, d.reshape(k, n, -1, width), x_hat)
            total = g if total is None else total + g
        return total


class ChannelNormRule(Rule):
    name = "channelnorm"

    def matches(self, module: nn.Module) -> bool:
        batchnorm = (isinstance(module, nn.modules.batchnorm._BatchNorm)
                     and (type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
                          or _is_timm(module, "BatchNormAct2d"))
                     and not module.training and module.track_running_stats)
        return ((batchnorm or type(module) is nn.GroupNorm) and module.affine
                and "weight" in module._parameters and not _has_hooks(module))

    def accepts(self, layer: Layer, calls: list[Call]) -> bool:
        return all(len(c.inputs()) == 1 and c.in_dims == [0] and c.out_dims == [0]
                   and c.inputs()[0].dim() >= 2 for c in calls)

    def per_sample_gradients(self, layer: Layer, calls: list[Call],
                             deltas: list[list[Tensor]]) -> Tensor:
        module = layer.module
        total = None
        for call, delta in zip(calls, deltas):
            x = call.inputs()[0]
            n, c = x.shape[:2]
            k = delta[0].shape[0]
            d = _before_activation(module, x, delta[0])
            d = d.reshape(k, n, c, -1).transpose(2, 3)             # (K, n, T, C)
            x_hat = lambda: _normalised(module, x).reshape(n, c, -1).transpose(1, 2)  # noqa: E731
            g = _entrywise_gradients(layer, d, x_hat)
            total = g if total is None else total + g
        return total


class EmbeddingRule(Rule):
    name = "embedding"

    def matches(self, module: nn.Module) -> bool:
        return (type(module) is nn.Embedding and module.max_norm is None
                and not module.scale_grad_by_freq
                and "weight" in module._parameters and not _has_hooks(module))

    def accepts(self, layer: Layer, calls: list[Call]) -> bool:
        if not all(len(c.inputs()) == 1 and c.in_dims[0] == 0 and c.out_dims == [0]
                   for c in calls):
            return False
        tokens = torch.cat([_tokens(layer.module, c.inputs()[0]) for c in calls], dim=1)
        layer.state["positions"] = tokens.shape[1]
        layer.state["matches"] = _matches_per_pair(tokens)
        return True

    def uses_tokens(self, layer: Layer) -> bool:
        if "head" in layer.state:   # a tied head's rows join the token entry (structured)
            return True
        vocab = layer.module.weight.shape[0]
        return _TOKEN_PAIR_COST * layer.state.get("matches", float(vocab)) < vocab

    def token_factors(self, layer: Layer, calls: list[Call], deltas: list[list[Tensor]]
                      ) -> tuple[Tensor, Tensor]:
        width = layer.module.weight.shape[1]
        tokens, ds = [], []
        for call, delta in zip(calls, deltas):
            k, n = delta[0].shape[:2]
            tokens.append(_tokens(layer.module, call.inputs()[0]))
            ds.append(delta[0].reshape(k, n, -1, width).permute(1, 2, 0, 3))  # (n, T, K, w)
        return torch.cat(tokens, dim=1), torch.cat(ds, dim=1).contiguous()

    def token_direction(self, layer: Layer, r: dict[str, Tensor]) -> Tensor:
        return r["weight"]

    def per_sample_gradients(self, layer: Layer, calls: list[Call],
                             deltas: list[list[Tensor]]) -> Tensor:
        module = layer.module
        vocab, width = module.weight.shape
        total = None
        for call, delta in zip(calls, deltas):
            tokens = call.inputs()[0]
            k, n = delta[0].shape[:2]
            d = delta[0].reshape(k, n, -1, width).transpose(0, 1)   # (n, K, T, d)
            idx = tokens.reshape(n, 1, -1, 1).expand(n, k, d.shape[2], width)
            if module.padding_idx is not None:   # the padding row gets no gradient
                d = d * (tokens.reshape(n, 1, -1, 1) != module.padding_idx)
            g = d.new_zeros(n, k, vocab, width).scatter_add_(2, idx, d).reshape(n, k, -1)
            total = g if total is None else total + g
        return total

    def cost(self, layer: Layer, k: int) -> tuple[float, float]:
        vocab, width = layer.module.weight.shape
        item = layer.module.weight.element_size()
        if self.uses_tokens(layer):
            rows = layer.state.get("head_rows", 0)     # of a tied head, matching each other
            positions = layer.state.get("positions", 1) + rows
            matches = layer.state.get("matches", float(vocab)) + rows
            return (float(_TOKEN_PAIR_COST * matches * k * k * width),
                    float(positions * (k * width * item + 8)))
        return float(k * k * vocab * width), float(k * vocab * width * item)


# Internal helpers

# A matching pair of positions costs about this many times its K² w multiply-adds (gathered
# rows, small batched products, scatter-add) against the per-sample form's GEMM.
_TOKEN_PAIR_COST = 8.0


def _tokens(module: nn.Embedding, tokens: Tensor) -> Tensor:
    """Tensor[n, T] int64 of one call's tokens, -1 at the padding index (no gradient there)."""
    flat = tokens.reshape(tokens.shape[0], -1).long()
    if module.padding_idx is not None:
        flat = flat.masked_fill(flat == module.padding_idx, -1)
    return flat


def _matches_per_pair(tokens: Tensor) -> float:
    """Expected pairs of positions holding the same (non-padding) token between two samples,
    estimated on the distinct rows of the probe's tokens (Tensor[B, T]); self-pairs when there
    is only one distinct row (an overestimate)."""
    rows = [r[r >= 0] for r in torch.unique(tokens, dim=0)]
    pairs = [(i, j) for i in range(len(rows)) for j in range(len(rows)) if i != j] or [(0, 0)]
    total = 0
    for i, j in pairs:
        other = torch.sort(rows[j]).values
        total += int((torch.searchsorted(other, rows[i], right=True)
                      - torch.searchsorted(other, rows[i])).sum())
    return total / len(pairs)


def _entrywise_gradients(layer: Layer, d: Tensor, x_hat) -> Tensor:
    """Tensor[n, K, P_l] of ``z = x̂ ⊙ w + b`` from δ ``d`` (K, n, T, W) and a function giving
    x̂ (n, T, W) (called only when the weight is trainable): ``Σ_t δ_t ⊙ x̂_t``, ``Σ_t δ_t``."""
    parts = []
    if "weight" in layer.params:
        parts.append(torch.einsum("antw,ntw->naw", d, x_hat()))
    if "bias" in layer.params:
        parts.append(d.sum(2).transpose(0, 1))
    return torch.cat(parts, dim=2)


def _is_timm(module: nn.Module, name: str) -> bool:
    """``module`` is timm's class ``name`` with its own forward (timm is optional)."""
    cls = type(module)
    return (cls.__name__ == name and cls.__module__.startswith("timm.")
            and "forward" in cls.__dict__)


def _before_activation(module: nn.Module, x: Tensor, d: Tensor) -> Tensor:
    """δ (K, *z.shape) at a norm's affine output: for timm's BatchNormAct2d, ``d`` taken back
    through ``act(drop(·))`` at the recorded input (one batched vector-Jacobian product);
    ``d`` itself for every other norm."""
    if not _is_timm(module, "BatchNormAct2d"):
        return d
    with torch.enable_grad():
        u = F.batch_norm(x, module.running_mean, module.running_var, module.weight.detach(),
                         module.bias.detach(), False, 0.0, module.eps).requires_grad_()
        y = module.act(module.drop(u.clone()))     # clone: an in-place activation
        return torch.autograd.grad(y, u, d, is_grads_batched=True)[0]


def _normalised(module: nn.Module, x: Tensor) -> Tensor:
    """x̂ of a GroupNorm or an eval-mode BatchNorm (before its affine weight and bias)."""
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean = module.running_mean.reshape(shape)
    var = module.running_var.reshape(shape)
    return (x - mean) / torch.sqrt(var + module.eps)
