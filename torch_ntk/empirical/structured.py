"""method="structured": the layer-factorised NTK, never forming the Jacobian of the model.

The kernel is a sum over parameters, so it splits into one share per layer. Forward hooks
record every call of every layer (its inputs and outputs); one batched reverse pass of the
model gives ``δ_a = ∂f_a/∂z`` for every output ``z`` of every call and all K model outputs at
once; each layer's rule (``rules/``) turns its calls and δ into Gram factors or per-sample
gradients, and the native Gram-sum op contracts them all (``native.gram.gram_sum``).

Parameters no rule can account for (shared between modules, or in modules whose calls don't
keep one sample per batch row) get their exact share from the per-sample Jacobian of those
parameters alone (``jacobian``). What this rests on is checked on every call by ``api``:
samples don't interact and each layer keeps them on their rows (``check_rows``, on a probe),
and on every block the factors predict the model's own ``J(x) r`` for every sample (``verify``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from torch_ntk.empirical import checks, jacobian, verify
from torch_ntk.empirical.factors import Factors, contract
from torch_ntk.empirical.rules import Call, Layer, rule_for
from torch_ntk.empirical.rules.base import input_tensors, map_tensors, output_tensors
from torch_ntk.empirical.verify import Projection


class StructuredNTK:
    """Structured NTK engine for one model; ``plan`` must run before ``factors``."""

    name = "structured"
    activations = 0   # bytes of the model's forward per sample (set from the probe)

    def __init__(self, model: nn.Module, params: Mapping[str, Tensor]) -> None:
        self.model = model
        self.params = dict(params)
        self._name_of = {id(p): name for name, p in self.params.items()}
        self.layers: list[Layer] = []
        self.foreign: dict[str, Tensor] = dict(self.params)
        self.foreign_jacobian = jacobian.PerSampleJacobian(model, self.foreign)
        self.ambiguous = False      # the probe size met a non-batch axis of the same size

    @property
    def factorised(self) -> bool:
        """True when at least one layer's share is computed by its rule."""
        return bool(self.layers)

    def plan(self, x_probe: Tensor) -> Tensor:
        """Runs a hooked forward on a probe batch to learn how each layer is called.

        A module with trainable parameters becomes a layer when every call keeps the batch on
        one axis of each output (and of the inputs that have it) and uses the module's own
        registered parameters. The batch axis is the one of size ``B = len(x_probe)``;
        ``ambiguous`` is set when some tensor has two such axes (plan again with another B).

        Returns:
            Tensor[B, *out_shape]: the model output on ``x_probe`` (no graph).
        """
        b = x_probe.shape[0]
        candidates = _candidates(self.model, self.params)
        with _recording(candidates) as calls, torch.enable_grad():
            f = self.model(x_probe)
        k = f.reshape(b, -1).shape[1] if isinstance(f, Tensor) and f.dim() else 1
        self.ambiguous = False
        kept = []
        for layer in candidates:
            recorded = calls[id(layer.module)]
            dims = [_batch_dims(c, b) for c in recorded]
            if any(d == "ambiguous" for d in dims):
                self.ambiguous = True
                continue
            if recorded and layer.rule.name == "embedding" and all(
                    d is None and c.own and _broadcast(c) for c, d in zip(recorded, dims)):
                layer.state["broadcast"] = True   # e.g. position ids of shape (1, T)
                dims = [([0] * len(c.inputs()), [0] * len(c.outputs)) for c in recorded]
            if not recorded or any(d is None or not c.own for c, d in zip(recorded, dims)):
                continue
            for c, (in_dims, out_dims) in zip(recorded, dims):
                c.in_dims, c.out_dims = in_dims, out_dims
            layer.state["k"] = k
            if "head" in layer.state and not _head_fits(layer, calls, b):
                continue   # the tied table goes to the Jacobian path
            if layer.rule.accepts(layer, recorded):
                layer.calls = len(recorded)
                layer.signature = [_signature(c) for c in recorded]
                kept.append(layer)
        self._assign(kept)
        self.probe_calls = {id(l.module): calls[id(l.module)] for l in self.layers}
        self.probe_calls.update({id(l.state["head"]): calls[id(l.state["head"])]
                                 for l in self.layers if "head" in l.state})
        self.probe_output = f.detach() if isinstance(f, Tensor) else f
        return self.probe_output

    def drop(self, names: set[str]) -> None:
        """Hands the named layers' parameters to the Jacobian path."""
        self._assign([l for l in self.layers if l.name not in names])

    def isolate(self, xs: Tensor, r: dict[str, Tensor], max_checks: int = 16,
                dtype: torch.dtype | None = None, block: Tensor | None = None
                ) -> list[str] | None:
        """Hands to the Jacobian path the layers whose share ``verify`` finds wrong.

        Dropping layers never makes the kernel wrong (their parameters go to the exact
        Jacobian path), so "verify passes once these layers are dropped" is monotone in the set,
        and a culprit is found by bisection over the current layers in ``log2(L) + 1`` checks
        (e.g. an Embedding whose table is also an output head through ``F.linear``). The state
        left behind always passed ``verify``.

        Args:
            xs (Tensor[S, *in_shape]): the samples ``verify`` failed on.
            r (dict of Tensor): the direction ``verify`` checks along.
            max_checks (int): ``verify`` calls allowed before giving up.
            dtype (torch.dtype, optional): the model's computing dtype (``verify.check``).
            block (Tensor, optional): the whole block: broadcast layers (looked up once for
                the batch) are suspects first, checked on it (their share can be wrong only
                across samples).
        Returns:
            list[str] or None: the layers dropped, or None (the layers are then unchanged)
            when no proper subset of them passes within ``max_checks``.
        """
        layers = list(self.layers)
        shared = [l.name for l in layers if l.state.get("broadcast")]
        if shared and block is not None:   # wrong only across samples: not seen on xs alone
            self._assign([l for l in layers if l.name not in shared])
            if verify.check(self, block, r, dtype=dtype).ok:
                return shared
            self._assign(layers)
        dropped: list[str] = []
        checks_left = max_checks

        def passes(extra: list[str]) -> bool:
            nonlocal checks_left
            checks_left -= 1
            gone = set(dropped) | set(extra)
            self._assign([l for l in layers if l.name not in gone])
            return verify.check(self, xs, r, dtype=dtype).ok

        while checks_left > 0:
            remaining = [l.name for l in layers if l.name not in dropped]
            lo, hi = 1, len(remaining)  # dropping all of them passes: the Jacobian alone
            while lo < hi and checks_left > 0:
                mid = (lo + hi) // 2
                if passes(remaining[:mid]):
                    hi = mid
                else:
                    lo = mid + 1
            if lo < hi:
                break
            dropped.append(remaining[lo - 1])
            if len(dropped) == len(layers) or checks_left == 0:
                break
            if passes([]):
                return dropped
        self._assign(layers)
        return None

    def check_rows(self, x: Tensor, rows: Tensor) -> tuple[list[str], object]:
        """Layers whose calls on the batch ``x[rows]`` differ, row by row, from rows ``rows``
        of the probe's calls.

        Args:
            x (Tensor[B, *in_shape]): the probe batch given to ``plan``.
            rows (Tensor[m] int64): the probe rows to run as one batch (another size and
                order than the probe's).
        Returns:
            (list[str], output): names of layers that don't keep samples on their batch rows,
            and the model's output on ``x[rows]``.
        """
        broadcast = [l.name for l in self.layers if l.state.get("broadcast")]
        try:
            calls, f_rows = self._rows_forward(x, rows, expand=True)
        except Exception:   # noqa: BLE001 - the model can't take the expanded outputs
            if not broadcast:
                raise
            _, f_rows = self._rows_forward(x, rows, expand=False)
            return broadcast, f_rows
        if broadcast and not _rows_agree(f_rows, self.probe_output, rows):
            _, f_plain = self._rows_forward(x, rows, expand=False)
            if _rows_agree(f_plain, self.probe_output, rows):
                return broadcast, f_plain   # the expanded outputs changed the model's
        bad = []
        for layer in self.layers:
            if layer.state.get("broadcast"):
                continue   # shared by the batch: the outputs above are its check
            for module in [layer.module] + ([layer.state["head"]] if "head" in layer.state
                                            else []):
                small, batched = calls[id(module)], self.probe_calls[id(module)]
                if len(small) != len(batched) or not all(
                        _same_rows(c1, c2, rows) for c1, c2 in zip(small, batched)):
                    bad.append(layer.name)
                    break
        return bad, f_rows

    def _rows_forward(self, x: Tensor, rows: Tensor, expand: bool):
        """(recorded calls, output) of a hooked forward on ``x[rows]``; ``expand``: the
        outputs of broadcast layers expanded to the batch, as ``factors`` runs them."""
        with _recording(self.layers, expand_to=len(rows) if expand else None) as calls, \
                torch.enable_grad():
            f_rows = self.model(x[rows])
        return calls, f_rows.detach() if isinstance(f_rows, Tensor) else f_rows

    def pair_cost(self, k: int) -> float:
        """Multiply-adds per pair of inputs of the full-kernel contraction (see api's model)."""
        foreign = sum(p.numel() for p in self.foreign.values())
        return float(k * k * foreign + sum(l.rule.cost(l, k)[0] for l in self.layers))

    def bytes_per_sample(self, k: int, positions: bool = False) -> int:
        """Approximate factor memory per input, to size default batches (``positions``: as
        ``factors(positions=True)`` gives them)."""
        itemsize = next(iter(self.params.values())).element_size()
        total = k * sum(p.numel() for p in self.foreign.values()) * itemsize
        for layer in self.layers:
            by_position = (layer.rule.position_bytes(layer, k)
                           if positions and not layer.gram else None)
            total += layer.rule.cost(layer, k)[1] if by_position is None else by_position
        return int(total)

    def factors(self, x: Tensor, r: dict[str, Tensor] | None = None,
                positions: bool = False) -> Factors:
        """Gram factors of a block of inputs x (Tensor[n, *in_shape]).

        With a parameter direction ``r`` (by parameter name), ``projection`` holds the
        factors' prediction of ``J(x) r`` for ``verify``; ``outputs`` is always the block's
        output (Tensor[n, K]). With ``positions``, layers whose per-sample gradient is a sum
        over positions of outer products give those (``Rule.position_factors``) instead.
        """
        n = x.shape[0]
        with _recording(self.layers, clone=True, expand_to=n) as calls, torch.enable_grad():
            f = checks.check_output(self.model(x), n, "these inputs")
            for layer in self.layers:
                _check_calls(layer, calls[id(layer.module)], n)
                if "head" in layer.state:
                    _check_calls(layer, calls[id(layer.state["head"])], n,
                                 layer.state["head_calls"], layer.state["head_signature"])
            zs = [z for l in self.layers for c in _layer_calls(l, calls) for z in c.outputs]
            deltas = iter(_output_gradients(f, zs))
        out = Factors(outputs=f.detach())
        proj = None if r is None else Projection(n, f.shape[1], f.dtype, f.device, r)
        pooled, owners, names = [], [], []
        name_of = self._name_of
        for layer in self.layers:
            recorded = calls[id(layer.module)]
            per_call = [[next(deltas) for _ in c.outputs] for c in recorded]
            head = calls[id(layer.state["head"])] if "head" in layer.state else []
            head_deltas = [[next(deltas) for _ in c.outputs] for c in head]
            r_layer = None if r is None else self._relative(layer, r)
            owner = self._owner(layer)
            full = {rel: name_of[id(p)] for rel, p in layer.params.items()}
            entries = None
            if layer.gram:
                entries = layer.rule.gram_factors(layer, recorded[0], per_call[0])
            elif positions and not layer.rule.uses_tokens(layer):
                entries = layer.rule.position_factors(layer, recorded, per_call)
            if entries is not None:
                group = len(self.layers) + len(out.h) if len(entries) > 1 else -1
                weight, bias = (None, None) if r is None else layer.rule.gram_direction(
                    layer, r_layer)
                layout = ("gram", full.get("weight"), full.get("bias"),
                          layer.rule.transposed(layer))
                for h, d, c in entries:
                    out.add(h.detach(), d.detach(), c, group, owner=owner, params=layout)
                if proj is not None and len(entries) > 1:   # every position in one pass
                    proj.add_positions(torch.stack([h.detach() for h, _, _ in entries], 1),
                                       torch.stack([d.detach() for _, d, _ in entries], 1),
                                       entries[0][2], weight, bias)
                elif proj is not None and entries:
                    proj.add_gram(entries[0][0].detach(), entries[0][1].detach(),
                                  entries[0][2], weight, bias)
            elif layer.rule.uses_tokens(layer):
                tokens, d = layer.rule.token_factors(layer, recorded, per_call)
                if head:
                    tokens, d = _with_head_rows(tokens, d, head, head_deltas)
                out.add_tokens(tokens, d.detach(), owner=owner, param=full.get("weight"))
                if proj is not None:
                    proj.add_tokens(tokens, d.detach(), layer.rule.token_direction(layer, r_layer))
            else:
                g = layer.rule.per_sample_gradients(layer, recorded, per_call)
                parts = [t.detach() for t in g] if isinstance(g, list) else [g.detach()]
                sizes = iter([(full[rel], p.numel()) for rel, p in layer.params.items()])
                r_flat = None if r is None else layer.rule.gradient_direction(layer, r_layer)
                at = 0
                for part in parts:   # each part holds the next parameters, in order
                    held, width = [], 0
                    while width < part.shape[2]:
                        held.append(next(sizes))
                        width += held[-1][1]
                    pooled.append(part)
                    owners.append(owner)
                    names.append(held)
                    if proj is not None:
                        proj.add_gradients(part, r_flat[at:at + width])
                    at += width
        if self.foreign:
            blocks = self.foreign_jacobian.blocks(x)
            pooled.extend(blocks)
            owners.extend(jacobian.module_of(name) for name in self.foreign)
            names.extend([(name, p.numel())] for name, p in self.foreign.items())
            if proj is not None:
                for g, name in zip(blocks, self.foreign):
                    proj.add_gradients(g, r[name].reshape(-1))
        out.add_gradients(pooled, owners, names)
        out.projection = proj
        return out

    def contract(self, f1: Factors, f2: Factors, mode: str, out: Tensor,
                 symmetric: bool = False) -> Tensor:
        """Writes the kernel block between two factor sets into ``out``."""
        return contract(f1, f2, mode, out, symmetric)

    def _owner(self, layer: Layer) -> str | None:
        """The module that registers all of the layer's parameters (by their names in
        ``params``), or None when they come from several."""
        names = self._name_of
        modules = {jacobian.module_of(names[id(p)]) for p in layer.params.values()
                   if id(p) in names}
        return modules.pop() if len(modules) == 1 else None

    def _relative(self, layer: Layer, r: dict[str, Tensor]) -> dict[str, Tensor]:
        """The direction's entries for a layer's parameters, by names relative to its module."""
        return {rel: r[self._name_of[id(p)]] for rel, p in layer.params.items()}

    def _assign(self, kept: list[Layer]) -> None:
        """Decides which parameters each kept layer accounts for; the rest are foreign.

        A layer of the catch-all rule also takes the parameters of descendants that are not
        layers themselves (e.g. MultiheadAttention's ``out_proj``, parametrisation originals),
        when no other module uses them.
        """
        owners = _owners(self.model)
        full = {id(p): name for name, p in self.params.items()}
        taken: set[int] = set()
        for layer in kept:
            taken.update(id(p) for p in layer.params.values())
        for layer in sorted(kept, key=lambda l: -l.name.count(".") if l.name != "<root>" else 1):
            if layer.rule.name != "local":
                continue
            for rel, p in layer.module.named_parameters():
                if id(p) in full and id(p) not in taken and owners.get(id(p), 0) == 1:
                    layer.params[rel] = p
                    taken.add(id(p))
        self.layers = kept
        foreign = {n: p for n, p in self.params.items() if id(p) not in taken}
        if foreign.keys() != self.foreign.keys():
            self.foreign_jacobian = jacobian.PerSampleJacobian(self.model, foreign)
        self.foreign = foreign


def blocking_modules(model: nn.Module) -> list[str]:
    """Names of the modules holding trainable parameters that no factorisable layer covers."""
    names = []
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            names.append(f"{name or '<root>'} ({type(module).__name__})")
    return names


# Internal helpers

class _Recorded(Call):
    """A Call plus whether the module ran with its own registered parameters."""

    own: bool = True


def _candidates(model: nn.Module, params: Mapping[str, Tensor]) -> list[Layer]:
    """A Layer per module that owns trainable parameters (or is parametrised), each with its
    own rule; parameters shared by several modules are left to the Jacobian path, except an
    Embedding's table that a Linear head also uses as its weight (a tied LM head): the
    Embedding's layer takes it, with the head's calls recorded beside its own."""
    trainable = {id(p) for p in params.values()}
    owners = _owners(model)
    heads = _tied_heads(model, trainable, owners)
    layers = []
    for name, module in model.named_modules():
        rule = rule_for(module)
        own = {rel: p for rel, p in rule.own_params(module).items()
               if id(p) in trainable and (owners[id(p)] == 1 or (
                   id(module) in heads and rel == "weight"))}
        if parametrize.is_parametrized(module):
            own.update({rel: p for rel, p in module.named_parameters()
                        if rel.startswith("parametrizations.") and id(p) in trainable
                        and owners[id(p)] == 1})
        if own:
            layers.append(Layer(name or "<root>", module, rule, own))
            if id(module) in heads and "weight" in own:
                layers[-1].state["head"] = heads[id(module)]
    return layers


def _head_fits(layer: Layer, calls: dict[int, list], b: int) -> bool:
    """A tied head's probe calls: one input and one output each, the batch on the same axis
    (not the features'), the head's own weight; their batch axes and signature are kept."""
    head_calls = calls[id(layer.state["head"])]
    for c in head_calls:
        dims = _batch_dims(c, b)
        if dims in (None, "ambiguous") or not c.own or len(c.inputs()) != 1 or len(c.outputs) != 1:
            return False
        (bd,), (od,) = dims
        if bd is None or bd != od or bd == c.inputs()[0].dim() - 1:
            return False
        c.in_dims, c.out_dims = [bd], [od]
    layer.state["head_calls"] = len(head_calls)
    layer.state["head_signature"] = [_signature(c) for c in head_calls]
    layer.state["head_rows"] = min(layer.state.get("k", 1), layer.module.weight.shape[0])
    return True


def _tied_heads(model: nn.Module, trainable: set[int], owners: dict[int, int]
                ) -> dict[int, nn.Module]:
    """id(Embedding) -> the Linear that uses its table as its weight (and no other module),
    for the tables in ``trainable`` that the embedding rule and the linear rule both take."""
    tables = {}
    for module in model.modules():
        w = module._parameters.get("weight")
        if (w is not None and id(w) in trainable and owners.get(id(w)) == 2
                and rule_for(module).name == "embedding"):
            tables[id(w)] = module
    heads = {}
    for module in model.modules():
        w = module._parameters.get("weight")
        if (w is not None and id(w) in tables and tables[id(w)] is not module
                and isinstance(module, nn.Linear) and rule_for(module).name == "linear"):
            heads[id(tables[id(w)])] = module
    return heads


def _owners(model: nn.Module) -> dict[int, int]:
    """How many modules register each parameter (tied weights: more than one)."""
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    return owners


@contextlib.contextmanager
def _recording(layers: list[Layer], clone: bool = False,
               expand_to: int | None = None) -> Iterator[dict[int, list]]:
    """Forward hooks recording each call of each layer's module; always removed.

    The recorded arguments are those the call received before any forward pre-hook (a rule
    that re-runs the module runs its hooks once); the outputs are those after every forward
    hook. Calls made while autograd runs a backward (a checkpointed region recomputing its
    forward) are not calls of the forward and are not recorded. With ``clone`` the hook
    returns clones of the outputs, so that in-place operations later in the forward can't
    rewrite the recorded ``z``. A tied head (``layer.state["head"]``) is recorded too, under
    its own id. With ``expand_to``, a broadcast layer's inputs and outputs (leading axis 1,
    shared by the batch) are expanded to that many rows, so δ is per sample.
    """
    broadcast = {id(l.module) for l in layers if l.state.get("broadcast")}
    expand = (lambda tree: map_tensors(  # noqa: E731
        lambda t: t.expand(expand_to, *t.shape[1:]), tree))
    registered: dict[int, tuple[nn.Module, dict[str, Tensor]]] = {}
    for l in layers:
        units = [(l.module, {rel: l.module.get_parameter(rel) for rel in l.params})]
        if "head" in l.state:
            units.append((l.state["head"], {"weight": l.params["weight"]}))
        for module, params in units:   # a head with a bias of its own is a layer as well
            registered.setdefault(id(module), (module, {}))[1].update(params)
    calls: dict[int, list[_Recorded]] = {key: [] for key in registered}
    pending: dict[int, list[tuple]] = {key: [] for key in registered}
    handles = []

    def detached(tree):
        return map_tensors(Tensor.detach, tree)

    def in_backward() -> bool:
        return torch._C._current_graph_task_id() != -1

    def pre_hook(module, args, kwargs):
        if not in_backward():
            pending[id(module)].append((detached(args), detached(kwargs)))

    def hook_for(registered: dict[str, Tensor]):
        def hook(module, args, kwargs, output):
            if in_backward() or not pending[id(module)]:
                return None
            args, kwargs = pending[id(module)].pop()
            widened = expand_to is not None and id(module) in broadcast
            if widened:
                args, kwargs, output = expand(args), expand(kwargs), expand(output)
            outs = output_tensors(output)
            if clone and outs:  # recorded: clones of the outputs; returned: their clones
                output = map_tensors(Tensor.clone, output)
                outs = output_tensors(output)
            own = all(_current(module, rel) is p for rel, p in registered.items())
            call = _Recorded(args, kwargs, outs if outs is not None else [])
            call.own = own and outs is not None and len(outs) > 0
            calls[id(module)].append(call)
            if clone and outs:
                return map_tensors(Tensor.clone, output)
            return output if widened else None
        return hook

    try:
        for module, params in registered.values():
            handles.append(module.register_forward_pre_hook(
                pre_hook, prepend=True, with_kwargs=True))
            handles.append(module.register_forward_hook(hook_for(params), with_kwargs=True))
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def _current(module: nn.Module, rel: str) -> Tensor | None:
    """The parameter registered under ``rel`` right now (functional_call swaps them)."""
    *path, leaf = rel.split(".")
    for part in path:
        module = getattr(module, part, None)
        if module is None:
            return None
    return module._parameters.get(leaf)


def _batch_dims(call: Call, b: int):
    """(in_dims, out_dims) of a probe call: the axis of size B of each tensor, None for an
    input without one; None when an output has none, "ambiguous" when a tensor has two."""
    in_dims = []
    for t in input_tensors(call.args, call.kwargs):
        axes = [i for i, s in enumerate(t.shape) if s == b]
        if len(axes) > 1:
            return "ambiguous"
        in_dims.append(axes[0] if axes else None)
    out_dims = []
    for t in call.outputs:
        axes = [i for i, s in enumerate(t.shape) if s == b]
        if len(axes) > 1:
            return "ambiguous"
        if not axes:
            return None
        out_dims.append(axes[0])
    if all(d is None for d in in_dims):
        return None
    return in_dims, out_dims


def _signature(call: Call) -> tuple:
    """Shapes of the call's tensors with the batch axis removed (None: not batched)."""
    def strip(t, d):
        return (tuple(t.shape), None) if d is None else (
            tuple(s for i, s in enumerate(t.shape) if i != d), d)
    return (tuple(strip(t, d) for t, d in zip(call.inputs(), call.in_dims)),
            tuple(strip(t, d) for t, d in zip(call.outputs, call.out_dims)))


class StructureChanged(ValueError):
    """A block called a layer differently from the probe (``auto`` takes the Jacobian)."""


def _check_calls(layer: Layer, calls: list[_Recorded], n: int, expected: int | None = None,
                 signature: list | None = None) -> None:
    """Every block must call the layer (or its tied head: ``expected`` calls of ``signature``)
    as the probe did, with n samples on the batch axes."""
    expected = layer.calls if expected is None else expected
    signature = layer.signature if signature is None else signature
    if len(calls) != expected:
        raise StructureChanged(
            f"empirical_ntk: layer {layer.name!r} was called {len(calls)} times on one batch but "
            f"{expected} times on another; the model's structure depends on its input. Use "
            "method='jacobian'.")
    for call, sig in zip(calls, signature):
        (ins, outs) = sig
        call.in_dims = [d for _, d in ins]
        call.out_dims = [d for _, d in outs]
        ok = call.own and len(call.inputs()) == len(ins) and len(call.outputs) == len(outs)
        ok = ok and all(_fits(t, shape, d, n) for t, (shape, d) in zip(call.inputs(), ins))
        ok = ok and all(_fits(t, shape, d, n) for t, (shape, d) in zip(call.outputs, outs))
        if not ok:
            raise StructureChanged(
                f"empirical_ntk: layer {layer.name!r} was called with other shapes on a block "
                f"of {n} inputs than on the probe; the model's structure depends on its input "
                "or batch size. Use method='jacobian'.")


def _broadcast(call: Call) -> bool:
    """Every tensor of the call has a leading axis of 1 (shared by the batch, e.g. position
    ids), and it returns tensors."""
    tensors = call.inputs() + call.outputs
    return bool(call.outputs) and all(t.dim() >= 1 and t.shape[0] == 1 for t in tensors)


def _rows_agree(f_rows, f_probe, rows: Tensor) -> bool:
    """The outputs on ``x[rows]`` equal rows ``rows`` of the probe's (to rounding)."""
    if not (isinstance(f_rows, Tensor) and isinstance(f_probe, Tensor)):
        return False
    ref = f_probe.index_select(0, rows.to(f_probe.device))
    return _agree(f_rows, ref, ref[0].numel() if ref.dim() and len(ref) else 1)


def _layer_calls(layer: Layer, calls: dict[int, list]) -> list:
    """The recorded calls whose outputs need δ for a layer: its own, then its tied head's."""
    own = calls[id(layer.module)]
    return own + calls[id(layer.state["head"])] if "head" in layer.state else own


def _with_head_rows(tokens: Tensor, d: Tensor, head: list[Call], deltas: list[list[Tensor]]
                    ) -> tuple[Tensor, Tensor]:
    """A tied table's token entry ``(tokens [n, T], d [n, T, K, w])`` with the rows its head
    reads appended: row v of the head's weight has gradient ``Σ_t δ_t[v] h_t`` for output a,
    one entry per row v that some δ of the block reaches (the rest are zero), so the pairs of
    entries holding the same row sum to the table's share exactly."""
    n = tokens.shape[0]
    for call, delta in zip(head, deltas):
        bd = call.in_dims[0]
        h = call.inputs()[0].movedim(bd, 0)
        h = h.reshape(n, -1, h.shape[-1])                                 # (n, T', w)
        dl = delta[0].movedim(bd + 1, 1)
        dl = dl.reshape(dl.shape[0], n, -1, dl.shape[-1])                  # (K, n, T', V)
        active = (_column_reach(dl.reshape(-1, dl.shape[-1])) != 0).nonzero().squeeze(1)
        rows = torch.einsum("kntv,ntw->nvkw", dl.index_select(3, active), h)
        tokens = torch.cat([tokens, active.expand(n, -1)], dim=1)
        d = torch.cat([d, rows.to(d.dtype)], dim=1)
    return tokens, d.contiguous()


def _column_reach(m: Tensor) -> Tensor:
    """``max |m[:, v]|`` per column of m (Tensor[R, V]; NaN where a column holds one), over
    chunks of rows whose temporaries stay in cache (one pass over m: the δ of an LM head's
    logits may be a gigabyte)."""
    reach = m.new_zeros(m.shape[1])
    for start in range(0, m.shape[0], _REACH_ROWS):
        torch.maximum(reach, m[start:start + _REACH_ROWS].abs().amax(0), out=reach)
    return reach


_REACH_ROWS = 32


def _fits(t: Tensor, shape: tuple, d: int | None, n: int) -> bool:
    if d is None:
        return tuple(t.shape) == shape
    return (t.dim() == len(shape) + 1 and t.shape[d] == n
            and tuple(s for i, s in enumerate(t.shape) if i != d) == shape)


def _same_rows(small: Call, batched: Call, rows: Tensor) -> bool:
    """True when a call on the batch ``x[rows]`` equals rows ``rows`` of the probe's call (to
    rounding), every tensor along the probe's batch axis."""
    pairs = list(zip(small.outputs, batched.outputs, batched.out_dims))
    pairs += [(a, b, d) for a, b, d in zip(small.inputs(), batched.inputs(), batched.in_dims)
              if d is not None and a.is_floating_point()]
    if len(small.outputs) != len(batched.outputs):
        return False
    for a, b, d in pairs:
        a, ref = a.detach(), b.detach().index_select(d, rows.to(b.device))
        if not _agree(a, ref, a.shape[-1] if a.dim() else 1):
            return False
    return True


def _agree(a: Tensor, ref: Tensor, width: int) -> bool:
    """Same shape and, to the rounding of sums of ``width`` terms, the same values (integer
    tensors: equal)."""
    if a.shape != ref.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, ref)
    if not ref.numel():
        return True
    tol = checks.rounding_tolerance(a.dtype, width)
    return float((a - ref).abs().max()) <= tol * max(float(ref.abs().max()), 1e-30)


def _output_gradients(f: Tensor, zs: list[Tensor]) -> list[Tensor]:
    """δ = ∂f_a/∂z for every output a, as Tensor[K, *z.shape] per z (zero where unused)."""
    if not zs:
        return []
    n, k = f.shape
    if not f.requires_grad:  # the output doesn't depend on any parameter
        return [z.new_zeros((k,) + z.shape) for z in zs]
    eye = torch.eye(k, dtype=f.dtype, device=f.device)
    seeds = eye[:, None, :].expand(k, n, k)
    live = [i for i, z in enumerate(zs) if z.requires_grad]
    grads: list = [None] * len(zs)
    if live:
        try:
            got = torch.autograd.grad(f, [zs[i] for i in live], seeds, is_grads_batched=True,
                                      allow_unused=True)
        except RuntimeError as exc:  # some backward lacks a batching rule: one pass per output
            if "use_reentrant" in str(exc):
                raise
            per_output = [torch.autograd.grad(f, [zs[i] for i in live], seeds[a],
                                              retain_graph=True, allow_unused=True)
                          for a in range(k)]
            got = [None if g[0] is None else torch.stack(g) for g in zip(*per_output)]
        for i, g in zip(live, got):  # None: z doesn't reach f (zeros below)
            grads[i] = None if g is None else g.detach()
    return [g if g is not None else z.new_zeros((k,) + z.shape).detach()
            for g, z in zip(grads, zs)]
