"""method="jacobian": the torch.func reference (functional_call + vmap(jacrev)).

Works for any model whose samples don't interact. Per block of inputs it forms the
per-sample Jacobian ``J (n, K, P)``, one block per parameter, and contracts it with the
Gram-sum op (the Jacobian as per-sample gradients); memory is ``O(n·K·P)`` per block, so
callers tile the inputs.

Models that ``torch.func.vmap`` cannot run (e.g. ``nn.RNN``/``nn.GRU``/``nn.LSTM``, whose
kernels have no batching rule, or forwards that call ``.item()``) get the same Jacobian from
plain autograd, one reverse pass per sample and output. Each block tries vmap until one fails
(``PerSampleJacobian.vmap``; some batching rules fail at one block size only), then autograd
is kept; a model that vmap could not run is remembered (weakly, by identity), so later calls
go straight to autograd. So is one whose Jacobian the checks found torch.func to get wrong
(a parameter also held outside its registered attribute: ``use_autograd``).
"""
from __future__ import annotations

import threading
import weakref
from typing import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from torch_ntk.empirical import checks, state
from torch_ntk.empirical.factors import Factors, contract
from torch_ntk.empirical.verify import Projection

_SEEDS = 32  # reverse passes batched together by the autograd path (samples per chunk × K)


def module_of(name: str) -> str:
    """The qualified name of the module that registers the parameter ``name``."""
    return name.rpartition(".")[0]


class JacobianNTK:
    """Reference NTK engine: factors are per-sample Jacobians, contracted by ``gram_sum``
    (one entry per parameter; the upper triangle only for a symmetric block)."""

    name = "jacobian"
    activations = 0   # bytes of the model's forward per sample (set from the probe)

    def __init__(self, model: nn.Module, params: Mapping[str, Tensor]) -> None:
        self.model = model
        self.params = dict(params)
        self.num_params = sum(p.numel() for p in self.params.values())
        self.jacobian = PerSampleJacobian(model, self.params)

    @property
    def vmap(self) -> bool | None:
        """True: torch.func.vmap runs the model; False: per-sample autograd; None: no block yet."""
        return self.jacobian.vmap

    @property
    def per_sample(self) -> bool:
        """The factors are each sample's alone (torch.func.vmap runs the model on batches of
        one), so any batch of several samples is another batch for every one of them."""
        return self.jacobian.vmap is True

    def bytes_per_sample(self, k: int) -> int:
        itemsize = next(iter(self.params.values())).element_size()
        return k * self.num_params * itemsize

    def factors(self, x: Tensor, r: dict[str, Tensor] | None = None) -> Factors:
        """The per-parameter Jacobians ∂f_a(x_n)/∂θ (Tensor[n, K, P_θ]) as gram_sum entries,
        with their prediction of ``J(x) r`` when a direction ``r`` is given (``verify``)."""
        blocks = self.jacobian.blocks(x)
        f = self.jacobian.outputs
        out = Factors(outputs=f)
        if r is not None:
            out.projection = Projection(x.shape[0], f.shape[1], f.dtype, f.device, r)
            for g, name in zip(blocks, self.params):
                out.projection.add_gradients(g, r[name].reshape(-1))
        out.add_gradients(blocks, [module_of(name) for name in self.params],
                          [[(name, p.numel())] for name, p in self.params.items()])
        return out

    def contract(self, f1: Factors, f2: Factors, mode: str, out: Tensor,
                 symmetric: bool = False) -> Tensor:
        """Writes Σ_p J1[n, a, p] J2[m, b, p] (reduced per ``mode``) into ``out``."""
        return contract(f1, f2, mode, out, symmetric)


class PerSampleJacobian:
    """Per-sample Jacobians of one model w.r.t. a fixed set of its parameters.

    Each block tries ``vmap(jacrev)`` until it fails once. When torch.func cannot run the model
    on a block, the block is recomputed by plain autograd (a batched forward per chunk of samples, one reverse
    pass per sample and output, batched); only if that succeeds is the model marked as not
    vmappable, so an error of the model itself (bad input shape, non-finite output) is raised
    as it would be without vmap.

    Attributes:
        vmap (bool or None): the path taken, ``None`` until the first block, ``False`` once
            vmap failed or ``use_autograd`` was called (from the start for a model vmap has
            already failed on).
        vmap_error (str or None): why vmap could not run the model, when it could not.
    """

    def __init__(self, model: nn.Module, params: Mapping[str, Tensor]) -> None:
        self.model = model
        self.params = dict(params)
        self.slots = _distinct_slots(model, self.params)
        with _NOT_VMAPPABLE_GUARD:
            self.vmap_error: str | None = _NOT_VMAPPABLE.get(model)
        self.vmap: bool | None = None if self.vmap_error is None else False
        self._batched_grads: bool | None = None  # is_grads_batched works on this model
        self._k: int | None = None  # outputs per sample, once seen

    def use_autograd(self) -> None:
        """Takes the Jacobian from plain autograd on the real model from now on (torch.func's
        parameter swaps miss a parameter also held outside its registered attribute)."""
        self.vmap = False
        self.vmap_error = "its Jacobian under torch.func differed from the real model's"
        with _NOT_VMAPPABLE_GUARD:
            _NOT_VMAPPABLE[self.model] = self.vmap_error

    def __call__(self, x: Tensor) -> Tensor:
        """Jacobian of the flattened per-sample output w.r.t. the parameters.

        Args:
            x (Tensor[n, *in_shape]): a batch of inputs.
        Returns:
            Tensor[n, K, P]: P = total size of the parameters (in their order, each flattened).
        """
        return torch.cat(self.blocks(x), dim=2)

    def blocks(self, x: Tensor) -> list[Tensor]:
        """The Jacobian per parameter, in order: Tensor[n, K, P_θ] each (θ flattened)."""
        if self.vmap is False:
            return self._autograd(x)
        return self._decide(x)  # also later blocks: vmap can fail on one size only

    def _decide(self, x: Tensor) -> list[Tensor]:
        try:
            raw = self._vmap_raw(x)
        except torch.OutOfMemoryError:
            raise  # not a limitation of vmap: the caller should use smaller blocks
        except Exception as exc:  # noqa: BLE001 - the autograd path re-raises real errors
            error = f"{type(exc).__name__}: {exc}"
        else:
            self.vmap = True
            return self._assemble(*raw, x.shape[0])
        jac = self._autograd(x)  # outside the handler: the model's own error comes alone
        self.vmap, self.vmap_error = False, error
        with _NOT_VMAPPABLE_GUARD:
            _NOT_VMAPPABLE[self.model] = error
        return jac

    def _vmap_raw(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """vmap(jacrev) over the samples: (Jacobian by parameter name, outputs (n, K))."""
        detached = {name: p.detach() for name, p in self.params.items()}
        model, slots = self.model, self.slots

        def f_single(theta: dict[str, Tensor], xi: Tensor) -> tuple[Tensor, Tensor]:
            tensors = {slot: theta[name] for slot, name in slots.items()}
            y = functional_call(model, tensors, (xi.unsqueeze(0),), tie_weights=False,
                                strict=False).reshape(-1)
            return y, y

        with torch.no_grad(), state.registrations_kept(model):
            return vmap(jacrev(f_single, has_aux=True), in_dims=(None, 0))(detached, x)

    def _assemble(self, jac: dict[str, Tensor], f: Tensor, n: int) -> list[Tensor]:
        f = checks.check_output(f, n, "these inputs")
        self.outputs = f.detach()
        k = f.shape[1]
        return [jac[name].reshape(n, k, -1) for name in self.params]

    def _autograd(self, x: Tensor) -> list[Tensor]:
        """Plain autograd over chunks of samples, per parameter: Tensor[n, K, P_θ].

        The first chunk is one sample (it tells K); later ones hold ``_SEEDS // K`` samples.
        """
        chunks, outputs, start = [], [], 0
        counts_tokens = any(getattr(m, "scale_grad_by_freq", False) for m in self.model.modules())
        while start < x.shape[0]:  # a gradient that counts tokens must see one sample
            size = max(1, _SEEDS // self._k) if self._k and not counts_tokens else 1
            jac, f = self._chunk_jacobian(x[start:start + size])
            chunks.append(jac)
            outputs.append(f)
            start += size
        self.outputs = torch.cat(outputs)
        return [torch.cat(per_chunk) for per_chunk in zip(*chunks)]

    def _chunk_jacobian(self, xc: Tensor) -> tuple[list[Tensor], Tensor]:
        """(Tensor[m, K, P_θ] per parameter, outputs Tensor[m, K]) of a chunk xc
        (Tensor[m, *in_shape]), from one batched forward.

        Samples don't interact (empirical_ntk checks it), so the gradient of output ``a`` of
        sample ``i`` in the batched forward is that sample's own: one reverse pass per pair
        ``(i, a)``, seeded with a one-hot ``(m, K)`` tensor.
        """
        m = xc.shape[0]
        tensors = list(self.params.values())
        with torch.enable_grad():
            f = checks.check_output(self.model(xc), m, "these inputs")
            self._k = k = f.shape[1]
            if not f.requires_grad:  # the output doesn't depend on these parameters
                return [f.new_zeros(m, k, p.numel()) for p in tensors], f.detach()
            seeds = torch.eye(m * k, dtype=f.dtype, device=f.device).reshape(m * k, m, k)
            grads = self._seeded_gradients(f, tensors, seeds)
        return [per_seed(g, p, m * k).reshape(m, k, -1) for g, p in zip(grads, tensors)], \
            f.detach()

    def _seeded_gradients(self, f: Tensor, tensors: list[Tensor],
                          seeds: Tensor) -> list[Tensor]:
        """Σ seed·∂f/∂θ for each seed (Tensor[S, *f.shape]): Tensor[S, *θ.shape] per θ."""
        grad = dict(allow_unused=True, materialize_grads=True)
        if self._batched_grads is not False:
            try:
                grads = torch.autograd.grad(f, tensors, seeds, is_grads_batched=True,
                                            retain_graph=self._batched_grads is None, **grad)
                self._batched_grads = True
                return list(grads)
            except RuntimeError:
                if self._batched_grads:
                    raise
        last = seeds.shape[0] - 1
        per_seed = [torch.autograd.grad(f, tensors, seed, retain_graph=s < last, **grad)
                    for s, seed in enumerate(seeds)]
        self._batched_grads = False  # some backward formula lacks a batching rule
        return [torch.stack([t.to_dense() if t.layout != torch.strided else t for t in g])
                for g in zip(*per_seed)]


def per_sample_jacobian(model: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Jacobian of the flattened per-sample output w.r.t. ``params``, for one block.

    A model found not to run under vmap is remembered, so later blocks use autograd directly.

    Args:
        model (nn.Module): the network; parameters not in ``params`` are held fixed.
        params (dict of Tensor): the parameters to differentiate, by their model names.
        x (Tensor[n, *in_shape]): a batch of inputs.
    Returns:
        Tensor[n, K, P]: P = total size of ``params`` (in insertion order, each flattened).
    """
    return PerSampleJacobian(model, params)(x)


def per_seed(g: Tensor, p: Tensor, seeds: int) -> Tensor:
    """A batched gradient as Tensor[S, *θ.shape]: dense (a sparse Embedding gives sparse
    gradients), and expanded where autograd materialised an unused parameter's gradient
    without the seed axis."""
    g = g.detach()
    if g.layout != torch.strided:
        g = g.to_dense()
    if g.dim() == p.dim():
        g = g.expand(seeds, *p.shape)
    return g


# Internal helpers

# Models torch.func.vmap could not run (and plain autograd could), with vmap's error.
_NOT_VMAPPABLE: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()
_NOT_VMAPPABLE_GUARD = threading.Lock()


def _distinct_slots(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, str]:
    """Maps one name per registration slot of each parameter in ``params`` to its key there.

    A slot is a (module, attribute) pair. A module registered under two names (``m.a = m.b =
    lin``, or one layer twice in a Sequential) lists its parameters under both names but holds
    them in one slot: swapping that slot twice would leave torch.func's wrapper in the model
    when the swaps are undone. A parameter shared by two modules has two slots, and both must
    see the differentiated tensor.
    """
    key_of = {id(p): name for name, p in params.items()}
    slots: dict[str, str] = {}
    seen: set[tuple[int, str]] = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        for attr, p in module._parameters.items():
            if p is None or id(p) not in key_of or (id(module), attr) in seen:
                continue
            seen.add((id(module), attr))
            slots[f"{prefix}.{attr}" if prefix else attr] = key_of[id(p)]
    return slots
