"""What a layer rule is: how one family of modules enters the structured kernel.

A *layer* is a module together with the trainable parameters it is responsible for. During a
hooked forward every call of the module is recorded as a ``Call``: its inputs, its outputs and
the axis of each that holds the batch. ``δ = ∂f_a/∂z`` for every output ``z`` of every call comes
from one batched reverse pass of the whole model. A rule turns calls and δ into the layer's
share of the kernel, in one of two forms the Gram-sum op contracts:

- Gram factors ``(h Tensor[n, p], d Tensor[n, K, q], c)``, the share being
  ``(h·h' + c) (d_a·d'_b)`` (an affine layer called once per sample);
- per-sample gradients ``Tensor[n, K, P_l]`` (anything else), the share being their inner
  product over ``P_l``;
- or, for a lookup table, token entries ``(tokens [n, T], d [n, T, K, w])``: the share is the
  sum of ``d_t,a · d'_t',b`` over pairs of positions that read the same row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn


@dataclass
class Call:
    """One recorded call of a layer's module.

    Attributes:
        args (tuple), kwargs (dict): what the module was called with (top-level tensors
            detached; tensors nested in tuples, lists or dicts may still carry their graph).
        outputs (list of Tensor): the tensor outputs, in the order the module returns them.
        in_dims (list of int or None): batch axis of each tensor in ``inputs()``, nested ones
            included (None: the tensor is shared by all samples, e.g. a mask).
        out_dims (list of int): batch axis of each output.
    """

    args: tuple
    kwargs: dict
    outputs: list[Tensor]
    in_dims: list[int | None] = field(default_factory=list)
    out_dims: list[int] = field(default_factory=list)

    def inputs(self) -> list[Tensor]:
        """The tensor inputs, nested ones included, in ``input_tensors``' order."""
        return input_tensors(self.args, self.kwargs)


@dataclass
class Layer:
    """A module and the trainable parameters whose share of the kernel its rule computes."""

    name: str
    module: nn.Module
    rule: "Rule"
    params: dict[str, Tensor]       # names relative to ``module`` -> parameter
    calls: int = 0                  # calls per forward, learned from the probe
    signature: list[Any] = field(default_factory=list)  # per call: shapes without the batch axis
    state: dict[str, Any] = field(default_factory=dict)  # what the rule learned at planning

    @property
    def gram(self) -> bool:
        """True when the layer contributes Gram factors rather than per-sample gradients."""
        return self.rule.uses_gram(self)


class Rule:
    """How a family of modules enters the kernel. Subclasses override the hooks below."""

    name = "rule"

    def matches(self, module: nn.Module) -> bool:
        """True when this rule handles ``module`` (checked in registry order)."""
        raise NotImplementedError

    def own_params(self, module: nn.Module) -> dict[str, Tensor]:
        """Trainable parameters the rule computes for ``module`` (names relative to it)."""
        return {name: p for name, p in module.named_parameters(recurse=False)
                if p.requires_grad}

    def accepts(self, layer: Layer, calls: list[Call]) -> bool:
        """Whether the probe calls fit the rule (e.g. batch on the expected axis)."""
        return True

    def uses_gram(self, layer: Layer) -> bool:
        return False

    def gram_factors(self, layer: Layer, call: Call, delta: list[Tensor]
                     ) -> list[tuple[Tensor, Tensor, float]]:
        """Gram entries ``(h [n, p], d [n, K, q], c)`` of a layer with ``uses_gram``."""
        raise NotImplementedError

    def position_factors(self, layer: Layer, calls: list[Call], deltas: list[list[Tensor]]
                         ) -> list[tuple[Tensor, Tensor, float]] | None:
        """The per-sample gradient ``Σ_t δ_t h_tᵀ`` (over every call and position t) as Gram
        entries ``(h_t [n, p], d_t [n, K, q], c)`` in the layout of ``gram_direction``, or None
        where it is no such sum (what ``ntk_features`` sketches position by position)."""
        return None

    def position_bytes(self, layer: Layer, k: int) -> int | None:
        """Bytes per sample of ``position_factors``, or None where the rule has none."""
        return None

    def uses_tokens(self, layer: Layer) -> bool:
        return False

    def token_factors(self, layer: Layer, calls: list[Call], deltas: list[list[Tensor]]
                      ) -> tuple[Tensor, Tensor]:
        """Token entry ``(tokens [n, T], d [n, T, K, w])`` of a layer with ``uses_tokens``."""
        raise NotImplementedError

    def per_sample_gradients(self, layer: Layer, calls: list[Call],
                             deltas: list[list[Tensor]]) -> Tensor:
        """Tensor[n, K, P_l]: ``∂f_a(x_n)/∂θ`` over ``layer.params``, summed over the calls;
        or a list of such blocks, each holding whole parameters in ``layer.params`` order (no
        copy into one tensor)."""
        raise NotImplementedError

    def gram_direction(self, layer: Layer, r: dict[str, Tensor]
                       ) -> tuple[Tensor, Tensor | None]:
        """A parameter direction ``r`` (by name relative to the module) in the layout of the
        layer's Gram entries: ``(R [q, p], b [q] or None)``, so that an entry ``(h, d, c)``
        moves output a by ``d_a · (R h) + sqrt(c) d_a · b`` (``verify.Projection``)."""
        raise NotImplementedError

    def transposed(self, layer: Layer) -> bool:
        """True when the weight is stored ``(p, q)``, the transpose of ``gram_direction``'s
        ``R`` (what ``ntk_features`` hashes by the stored layout)."""
        return False

    def gradient_direction(self, layer: Layer, r: dict[str, Tensor]) -> Tensor:
        """``r`` in the layout of ``per_sample_gradients``: Tensor[P_l], the parameters in
        ``layer.params`` order, each flattened (the layout every rule's gradients follow)."""
        return torch.cat([r[name].reshape(-1) for name in layer.params])

    def token_direction(self, layer: Layer, r: dict[str, Tensor]) -> Tensor:
        """``r`` as a table (V, w) for the token entries of a layer with ``uses_tokens``."""
        raise NotImplementedError

    def cost(self, layer: Layer, k: int) -> tuple[float, float]:
        """(multiply-adds per pair of samples for the full kernel, bytes per sample)."""
        size = sum(p.numel() for p in layer.params.values())
        return float(k * k * size), float(k * size * _itemsize(layer))


def input_tensors(args: tuple, kwargs: dict) -> list[Tensor]:
    """Every tensor the module was called with, nested ones included: the Tensor leaves of the
    pytree ``(args, [kwargs[key] for key in sorted(kwargs)])`` (tuples, lists, dicts, named
    tuples), so positional first, then keywords by name, e.g. ``[x, h, c]`` for an LSTM's
    ``(x, (h, c))``. ``local._rebuild`` puts replacements back in this order."""
    if not kwargs and _flat_tensors(args):   # the common call: a few tensors, by position
        return list(args)
    leaves = pytree.tree_leaves((tuple(args), [kwargs[key] for key in sorted(kwargs)]))
    return [leaf for leaf in leaves if isinstance(leaf, Tensor)]


def output_tensors(output: Any) -> list[Tensor] | None:
    """The tensors a module returned, flattened (a Tensor, or nested tuples, lists and dicts
    of Tensors and Nones, like an LSTM's ``(y, (h, c))``); None for anything else."""
    if isinstance(output, Tensor):
        return [output]
    leaves = pytree.tree_leaves(output)
    if not all(leaf is None or isinstance(leaf, Tensor) for leaf in leaves):
        return None
    return [leaf for leaf in leaves if leaf is not None]


def map_tensors(fn, tree: Any) -> Any:
    """``tree`` (a pytree) with ``fn`` applied to each Tensor leaf, other leaves kept."""
    if isinstance(tree, Tensor):
        return fn(tree)
    if _flat_tensors(tree):
        return type(tree)(fn(t) for t in tree)
    if type(tree) is dict and not tree:
        return {}
    return pytree.tree_map(lambda t: fn(t) if isinstance(t, Tensor) else t, tree)


# Internal helpers

def _flat_tensors(items) -> bool:
    """A plain tuple or list whose items are all Tensors (no nesting to walk)."""
    return type(items) in (tuple, list) and all(isinstance(t, Tensor) for t in items)


def _itemsize(layer: Layer) -> int:
    p = next(iter(layer.params.values()), None)
    return p.element_size() if p is not None else torch.get_default_dtype().itemsize
