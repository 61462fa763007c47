"""Any other module with trainable parameters: per-sample gradients of that module alone.

Convolutions (any dimension, stride, padding, dilation, groups, transposed), normalisation
layers (LayerNorm, GroupNorm, eval-mode BatchNorm affine), Embedding, MultiheadAttention,
parametrised layers (weight_norm, spectral_norm, orthogonal: the originals are the parameters),
custom modules with bare ``nn.Parameter``s, recurrent layers: the share of a layer's parameters
is the inner product of per-sample gradients ``g_n,a = ∂f_a(x_n)/∂θ_l``, and each is a
vector-Jacobian product of the *module* (not the model) at its recorded inputs, with the
recorded ``δ_a = ∂f_a/∂z`` as cotangent:

    g_n,a = vjp_θ(module(θ; inputs_n))(δ_a,n)

computed with ``torch.func.vmap`` over samples and outputs. Modules torch.func cannot vmap
(e.g. cuDNN recurrent layers) are handled one sample at a time with plain autograd.

The inputs are every tensor of the call, nested ones included (an LSTMCell's ``(h, c)``, a list
or dict argument), each taken along its own batch axis or shared when it has none. Sparse
gradients (``nn.Embedding(sparse=True)``) are made dense. A backward that counts tokens
(``scale_grad_by_freq``) sees one sample's tokens either way: vmap's embedding backward counts
per sample, and the loop runs one sample at a time.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from torch_ntk.empirical import state
from torch_ntk.empirical.jacobian import per_seed
from torch_ntk.empirical.rules.base import Call, Layer, Rule, output_tensors


class LocalRule(Rule):
    name = "local"

    def matches(self, module: nn.Module) -> bool:
        return True

    def per_sample_gradients(self, layer: Layer, calls: list[Call],
                             deltas: list[list[Tensor]]) -> Tensor:
        total = None
        for call, delta in zip(calls, deltas):
            g = None
            if not layer.state.get("no_vmap"):
                try:
                    g = _vmapped(layer, call, delta)
                except (RuntimeError, NotImplementedError, ValueError):
                    layer.state["no_vmap"] = True  # decided once: this module can't be vmapped
            if g is None:
                g = _looped(layer, call, delta)
            total = g if total is None else total + g
        return total


# Internal helpers

def _inputs(call: Call) -> list[Tensor]:
    """The call's tensor inputs (``input_tensors`` order), cut from the graph: a state nested
    in a tuple (an LSTMCell's ``(h, c)``) may still carry the earlier calls' graph, which holds
    this layer's parameters again."""
    return [x.detach() for x in call.inputs()]


def _rebuild(call: Call, tensors: list[Tensor]) -> tuple[tuple, dict]:
    """The call's args and kwargs with its tensors, nested ones included, replaced by
    ``tensors`` (in ``input_tensors`` order), in the same tuples, lists and dicts."""
    keys = sorted(call.kwargs)
    leaves, spec = pytree.tree_flatten((tuple(call.args), [call.kwargs[key] for key in keys]))
    it = iter(tensors)
    leaves = [next(it) if isinstance(leaf, Tensor) else leaf for leaf in leaves]
    args, values = pytree.tree_unflatten(leaves, spec)
    return tuple(args), dict(zip(keys, values))


def _vmapped(layer: Layer, call: Call, delta: list[Tensor]) -> Tensor:
    """vmap over samples of vmap over outputs of the module's vjp."""
    theta = {name: p.detach() for name, p in layer.params.items()}
    in_dims = call.in_dims
    out_dims = call.out_dims

    def per_sample(xs: list[Tensor], ds: list[Tensor]) -> dict[str, Tensor]:
        full = [x if d is None else x.unsqueeze(d) for x, d in zip(xs, in_dims)]
        args, kwargs = _rebuild(call, full)

        def forward(th):
            outs = output_tensors(functional_call(layer.module, th, args, kwargs, strict=False))
            return tuple(o.squeeze(d) for o, d in zip(outs, out_dims))

        _, pullback = vjp(forward, theta)
        return vmap(lambda *dk: pullback(tuple(dk))[0])(*ds)

    with state.registrations_kept(layer.module):  # no batched tensor left in a buffer
        grads = vmap(per_sample, in_dims=(list(in_dims), [d + 1 for d in out_dims]),
                     out_dims=0)(_inputs(call), delta)
    n = delta[0].shape[out_dims[0] + 1]
    k = delta[0].shape[0]
    return torch.cat([grads[name].reshape(n, k, -1) for name in theta], dim=2)


def _looped(layer: Layer, call: Call, delta: list[Tensor]) -> Tensor:
    """One sample at a time: forward on its slice, reverse passes for its K cotangents."""
    names = list(layer.params)
    params = [layer.params[name] for name in names]
    n = delta[0].shape[call.out_dims[0] + 1]
    inputs = _inputs(call)
    rows = []
    for i in range(n):
        xs = [x if d is None else x.narrow(d, i, 1) for x, d in zip(inputs, call.in_dims)]
        args, kwargs = _rebuild(call, xs)
        with torch.enable_grad():
            outs = output_tensors(layer.module(*args, **kwargs))
        seeds = [dl.narrow(d + 1, i, 1) for dl, d in zip(delta, call.out_dims)]
        rows.append(_vjp_rows(outs, params, seeds))
    return torch.stack(rows)


def _vjp_rows(outs: list[Tensor], params: list[Tensor], seeds: list[Tensor]) -> Tensor:
    """Tensor[K, P]: gradients of Σ <outs, seeds[a]> w.r.t. params, for every output a."""
    k = seeds[0].shape[0]
    used = [(o, s) for o, s in zip(outs, seeds) if o.requires_grad]
    if not used:
        return seeds[0].new_zeros(k, sum(p.numel() for p in params))
    outs, seeds = zip(*used)

    def flat(grads: Any) -> Tensor:
        return torch.cat([per_seed(g, p, k).reshape(k, -1) for g, p in zip(grads, params)],
                         dim=1)

    try:
        grads = torch.autograd.grad(outs, params, seeds, is_grads_batched=True,
                                    allow_unused=True, materialize_grads=True)
        return flat(grads)
    except RuntimeError:  # no batching rule for some backward: one pass per output
        per_output = [torch.autograd.grad(outs, params, [s[a] for s in seeds], retain_graph=True,
                                          allow_unused=True, materialize_grads=True)
                      for a in range(k)]
        return torch.stack([torch.cat([per_seed(g, p, 1).reshape(-1) for g, p in zip(gs, params)])
                            for gs in per_output])
