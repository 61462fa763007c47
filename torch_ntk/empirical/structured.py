"""method="structured": the layer-factorised NTK, never forming the Jacobian.

For an affine layer ``z = α W h + β b`` the gradient of output ``a`` w.r.t. W is
``α δ_a hᵀ`` with ``δ_a = ∂f_a/∂z``, so the layer's share of the kernel is
``(α² h·h' + β²) (δ_a·δ'_b)``: a Hadamard product of two Grams (see ``native.gram.gram_sum``).
Forward hooks collect ``h`` and ``z``; one batched reverse pass gives ``δ`` for all K outputs.

Layers used at several positions per sample (Linear over a sequence ``(N, T, d)``, Conv
patches, a layer called twice) contribute through their per-sample weight gradients
``Σ_t α δ_t h_tᵀ``. Trainable parameters anywhere else (LayerNorm affine, Embedding, custom
modules, weights shared between layers) get their exact share from the Jacobian of those
parameters alone (``_jacobian``). The result is the exact NTK of the whole model.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_ntk.empirical import checks, jacobian
from torch_ntk.infinite.ntkmlp import NTKLinear
from torch_ntk.native.gram import gram_sum


@dataclass
class Factors:
    """Per-block factors: gram_sum entries ``(h Tensor[n, p], d Tensor[n, K, q], c)``."""

    h: list[Tensor] = field(default_factory=list)
    d: list[Tensor] = field(default_factory=list)
    c: list[float] = field(default_factory=list)


@dataclass
class _Layer:
    """A factorisable layer and how its trainable parameters enter the kernel."""

    name: str
    module: nn.Module
    weight: bool          # weight is trainable
    bias: bool            # bias exists and is trainable
    w_scale: float
    b_scale: float
    weight_param: Tensor | None = None  # the registered parameters the hooks expect
    bias_param: Tensor | None = None
    calls: int = 0        # forward calls per pass, learned from the probe
    positions: int = 1    # positions per sample summed over calls (T)

    @property
    def per_position(self) -> bool:
        """True when the layer needs per-sample gradients instead of a plain Gram."""
        return (self.calls != 1 or self.positions != 1
                or isinstance(self.module, (nn.Conv1d, nn.Conv2d)))


class StructuredNTK:
    """Structured NTK engine for one model; ``plan`` must run before ``factors``."""

    name = "structured"

    def __init__(self, model: nn.Module, params: Mapping[str, Tensor]) -> None:
        self.model = model
        self.params = dict(params)
        self.layers = _find_layers(model)
        self.foreign: dict[str, Tensor] = {}
        self._update_foreign()

    @property
    def factorised(self) -> bool:
        """True when at least one trainable parameter goes through the Gram path."""
        return bool(self.layers)

    def plan(self, x_probe: Tensor) -> Tensor:
        """Runs a hooked forward on a probe batch to learn how each layer is called.

        Layers that are never called, called with other parameters (``functional_call``),
        or whose calls don't keep the batch dimension first are handed to the Jacobian path.

        Returns:
            Tensor[B, *out_shape]: the model output on ``x_probe`` (no graph).
        """
        b = x_probe.shape[0]
        seen: dict[int, list[tuple]] = {id(l.module): [] for l in self.layers}

        def record(layer: _Layer):
            def hook(module, inputs, output):
                own = module.weight is layer.weight_param and module.bias is layer.bias_param
                seen[id(module)].append((inputs[0].shape, output.shape,
                                         own and output.requires_grad))
            return hook

        with _hooks([(l.module, record(l)) for l in self.layers]), torch.enable_grad():
            f = self.model(x_probe)
        kept = []
        for layer in self.layers:
            calls = seen[id(layer.module)]
            if calls and all(ok and _batched_call(layer.module, s_in, s_out, b)
                             for s_in, s_out, ok in calls):
                layer.calls = len(calls)
                layer.positions = sum(_positions(layer.module, s_out) for _, s_out, _ in calls)
                kept.append(layer)
        self.layers = kept
        self._update_foreign()
        return f.detach() if isinstance(f, Tensor) else f

    def bytes_per_sample(self, k: int) -> int:
        """Approximate factor memory per input, to size default batches."""
        itemsize = next(iter(self.params.values())).element_size()
        total = k * sum(p.numel() for p in self.foreign.values())
        for layer in self.layers:
            w = layer.module.weight
            q, p = w.shape[0], w[0].numel()
            if layer.per_position:
                total += k * q * (p + 1) + layer.positions * (p + k * q)
            else:
                total += p + k * q
        return total * itemsize

    def factors(self, x: Tensor) -> Factors:
        """Gram factors of a block of inputs x (Tensor[n, *in_shape])."""
        n = x.shape[0]
        captured: dict[int, list[tuple[Tensor, Tensor]]] = {id(l.module): [] for l in self.layers}

        def capture(layer: _Layer):
            def hook(module, inputs, output):
                captured[id(module)].append((inputs[0].detach(), output))
                return output.clone()  # later in-place ops must not rewrite the captured z
            return hook

        with _hooks([(l.module, capture(l)) for l in self.layers]), torch.enable_grad():
            f = checks.check_output(self.model(x), n, "these inputs")
            for layer in self.layers:
                if len(captured[id(layer.module)]) != layer.calls:
                    raise ValueError(
                        f"empirical_ntk: layer {layer.name!r} was called "
                        f"{len(captured[id(layer.module)])} times on one batch but {layer.calls} "
                        "times on another; the model's structure depends on its input. Use "
                        "method='jacobian'.")
            zs = [z for l in self.layers for _, z in captured[id(l.module)]]
            deltas = iter(_output_gradients(f, zs))
        out = Factors()
        pooled = []
        for layer in self.layers:
            calls = [(h, next(deltas)) for h, _ in captured[id(layer.module)]]
            if layer.per_position:
                pooled.extend(_per_sample_gradients(layer, calls))
            else:
                h, delta = calls[0]
                if not layer.weight:
                    h = h.new_empty(n, 0)
                elif layer.w_scale != 1.0:
                    h = h * layer.w_scale
                out.h.append(h.contiguous())
                out.d.append(delta.transpose(0, 1).contiguous())
                out.c.append(layer.b_scale ** 2 if layer.bias else 0.0)
        if self.foreign:
            pooled.append(jacobian.per_sample_jacobian(self.model, self.foreign, x))
        if pooled:
            out.h.append(x.new_empty(n, 0, dtype=pooled[0].dtype))
            out.d.append(torch.cat(pooled, dim=2))
            out.c.append(1.0)
        return out

    def contract(self, f1: Factors, f2: Factors, mode: str, out: Tensor,
                 symmetric: bool = False) -> Tensor:
        """Writes the kernel block between two factor sets into ``out``."""
        return gram_sum(f1.h, f2.h, f1.d, f2.d, f1.c, mode=mode, out=out,
                              symmetric=symmetric)

    def verify(self, x: Tensor) -> float:
        """Relative error of the structured ``Θ_aa(x, x)`` against plain autograd, for x[:1].

        A parameter of a factorised layer that is also used outside that layer's forward
        (e.g. a weight passed to ``F.linear`` elsewhere) breaks the factorisation; this
        catches it on one sample and at most 16 outputs.
        """
        x = x[:1]
        factors = self.factors(x)
        k = factors.d[0].shape[1] if factors.d else 1
        dtype = next(iter(self.params.values())).dtype
        got = torch.empty(1, 1, k, dtype=dtype, device=x.device)
        self.contract(factors, factors, "diagonal", got)
        params = list(self.params.values())
        with torch.enable_grad():
            f = self.model(x).reshape(-1)
            rows = min(k, 16)
            want = torch.stack([sum((g.double() ** 2).sum() for g in torch.autograd.grad(
                f[a], params, retain_graph=a < rows - 1, allow_unused=True,
                materialize_grads=True)) for a in range(rows)])
        got = got.reshape(-1)[:rows].double()
        return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))

    def _update_foreign(self) -> None:
        """Trainable parameters outside the factorised layers."""
        covered = {id(p) for layer in self.layers
                   for p in (layer.module.weight, layer.module.bias) if p is not None}
        self.foreign = {n: p for n, p in self.params.items() if id(p) not in covered}


def blocking_modules(model: nn.Module) -> list[str]:
    """Names of the modules holding trainable parameters that no factorisable layer covers."""
    names = []
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            names.append(f"{name or '<root>'} ({type(module).__name__})")
    return names


# Internal helpers

def _find_layers(model: nn.Module) -> list[_Layer]:
    """Factorisable layers with a trainable weight or bias; shared parameters excluded."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    layers = []
    for name, module in model.named_modules():
        scales = _affine_scales(module)
        if scales is None:
            continue
        own = [p for p in (module.weight, module.bias) if p is not None]
        if any(owners[id(p)] > 1 for p in own):
            continue
        weight = module.weight.requires_grad
        bias = module.bias is not None and module.bias.requires_grad
        if weight or bias:
            layers.append(_Layer(name or "<root>", module, weight, bias, *scales,
                                 weight_param=module.weight, bias_param=module.bias))
    return layers


def _affine_scales(module: nn.Module) -> tuple[float, float] | None:
    """(α, β) when ``module`` computes ``α W h + β b`` in a form the hooks can factorise."""
    if type(module).forward is nn.Linear.forward and isinstance(module, nn.Linear):
        return 1.0, 1.0
    if type(module).forward is NTKLinear.forward and isinstance(module, NTKLinear):
        return module.weight_scale, module.bias_scale
    for cls in (nn.Conv1d, nn.Conv2d):
        if type(module).forward is cls.forward and isinstance(module, cls):
            return (1.0, 1.0) if module.padding_mode == "zeros" else None
    return None


def _batched_call(module: nn.Module, s_in: torch.Size, s_out: torch.Size, b: int) -> bool:
    """True when one call saw a batch-first input of ``b`` samples."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        ok_rank = len(s_in) == len(module.kernel_size) + 2
    else:
        ok_rank = len(s_in) >= 2
    return ok_rank and s_in[0] == b and s_out[0] == b


def _positions(module: nn.Module, s_out: torch.Size) -> int:
    """Positions per sample at which the layer is applied (T)."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return int(torch.Size(s_out[2:]).numel())
    return int(torch.Size(s_out[1:-1]).numel())


@contextlib.contextmanager
def _hooks(pairs) -> Iterator[None]:
    """Registers forward hooks for the duration of the block; always removes them."""
    handles = []
    try:
        for module, hook in pairs:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _output_gradients(f: Tensor, zs: list[Tensor]) -> list[Tensor]:
    """δ = ∂f_a/∂z for every output a, as Tensor[K, *z.shape] per z (zero where unused)."""
    if not zs:
        return []
    n, k = f.shape
    eye = torch.eye(k, dtype=f.dtype, device=f.device)
    seeds = eye[:, None, :].expand(k, n, k)
    try:
        grads = torch.autograd.grad(f, zs, seeds, is_grads_batched=True, allow_unused=True,
                                    materialize_grads=True)
    except RuntimeError:  # some backward formulas lack a batching rule: one pass per output
        per_output = [torch.autograd.grad(f, zs, seeds[a], retain_graph=True,
                                          allow_unused=True, materialize_grads=True)
                      for a in range(k)]
        grads = [torch.stack(g) for g in zip(*per_output)]
    return [g.detach() for g in grads]


def _per_sample_gradients(layer: _Layer, calls: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """Per-sample gradients of the layer's trainable parameters, each Tensor[n, K, size]."""
    module = layer.module
    g_w, g_b = None, None
    for h, delta in calls:
        if isinstance(module, (nn.Conv1d, nn.Conv2d)):
            patches, delta = _conv_patches(module, h, delta)
            groups = module.groups
            k, n, q, t = delta.shape
            d_g = delta.reshape(k, n, groups, q // groups, t)
            p_g = patches.reshape(n, groups, -1, t)
            w = torch.einsum("angot,ngpt->nagop", d_g, p_g) if layer.weight else None
            b = delta.sum(3).transpose(0, 1) if layer.bias else None
        else:
            k, n, q = delta.shape[0], delta.shape[1], delta.shape[-1]
            d_t = delta.reshape(k, n, -1, q)
            h_t = h.reshape(n, -1, h.shape[-1])
            w = torch.einsum("antq,ntp->naqp", d_t, h_t) if layer.weight else None
            b = d_t.sum(2).transpose(0, 1) if layer.bias else None
        g_w = w if g_w is None or w is None else g_w + w
        g_b = b if g_b is None or b is None else g_b + b
    n, k = calls[0][1].shape[1], calls[0][1].shape[0]
    out = []
    if layer.weight:
        out.append(g_w.reshape(n, k, -1) * layer.w_scale)
    if layer.bias:
        out.append(g_b.reshape(n, k, -1) * layer.b_scale)
    return out


def _conv_patches(module: nn.Module, h: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """Unfolded input patches (n, C_in·kernel, T) and δ as (K, n, C_out, T) for a conv call."""
    k, n, c_out = delta.shape[0], delta.shape[1], delta.shape[2]
    if isinstance(module, nn.Conv1d):
        h = h.unsqueeze(2)
        kernel, stride, dilation = (1, *module.kernel_size), (1, *module.stride), (1, *module.dilation)
        pads = _explicit_padding(module, h.shape[3:])
        h = F.pad(h, pads)
    else:
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        h = F.pad(h, _explicit_padding(module, h.shape[2:]))
    patches = F.unfold(h, kernel, dilation=dilation, stride=stride)
    return patches, delta.reshape(k, n, c_out, -1)


def _explicit_padding(module: nn.Module, spatial: torch.Size) -> list[int]:
    """F.pad amounts (last dimension first) equal to the module's padding."""
    pads: list[int] = []
    dims = len(module.kernel_size)
    for i in reversed(range(dims)):
        if module.padding == "valid":
            lo = hi = 0
        elif module.padding == "same":
            total = module.dilation[i] * (module.kernel_size[i] - 1)
            lo, hi = total // 2, total - total // 2
        else:
            lo = hi = module.padding[i]
        pads += [lo, hi]
    return pads
