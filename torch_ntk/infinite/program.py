"""An infinite-width program: the network as a graph of rules, read from a module by tracing
its forward with ``torch.fx`` (or built for the ``depth=`` MLP), with its static shapes and the
position layout each node needs.

Layouts: a node keeps all pairs of positions ("full") only when something downstream mixes
positions (average or global pooling); otherwise only the covariance of each position with
itself across the two inputs, so a pool-free network costs O(P) per pair of inputs, a pooled
one O(P²).

Sums of branches are exact at infinite width only when the branches' cross-covariances vanish.
They do when one of two branches is an odd function of some layer's weights that the other
doesn't use (flipping those weights' sign flips one branch and leaves the other): an NTK layer's
output, and anything linear or odd (pooling, erf, tanh, LayerNorm) applied to it.
"""
from __future__ import annotations

import dataclasses
from typing import FrozenSet, List, Optional, Sequence

import torch
import torch.fx
from torch import nn

from torch_ntk.infinite.ntkmlp import NTKMLP
from torch_ntk.infinite.rules import registry
from torch_ntk.infinite.rules.activations import Activation, ClosedForm
from torch_ntk.infinite.rules.affine import Conv, Dense
from torch_ntk.infinite.rules.base import Rule, Shape
from torch_ntk.infinite.rules.norm import LayerNorm
from torch_ntk.infinite.rules.structure import Add, Input


@dataclasses.dataclass
class Node:
    """One rule applied to the values of earlier nodes."""

    rule: Rule
    inputs: List[int]
    label: str
    shape: Optional[Shape] = None
    full: bool = False
    odd: FrozenSet[int] = frozenset()       # affine nodes this value is an odd function of
    ancestors: FrozenSet[int] = frozenset()  # affine nodes this value depends on


@dataclasses.dataclass
class Program:
    nodes: List[Node]
    output: int
    input_shape: tuple = ()
    fusions: dict = dataclasses.field(default_factory=dict)  # conv node -> its activation
    # input nodes read only by convolutions, which take their windows from the data's patches
    patched_inputs: frozenset = frozenset()
    dense_fusions: dict = dataclasses.field(default_factory=dict)  # activation -> its dense

    @property
    def pair_entries(self) -> int:
        """The most entries any node holds per pair of inputs."""
        return max(_entries(n) for n in self.nodes)


def trace(model: nn.Module) -> Program:
    """The program of ``model``'s forward; ValueError naming what can't be read."""
    _check_untouched(model)
    if isinstance(model, NTKMLP) or registry.module_rules(model, "model") is not None:
        chain = registry.module_rules(model, type(model).__name__)
        if chain is None:
            raise ValueError(registry.unsupported(model, "model"))
        nodes: List[Node] = []
        at = _append(nodes, Input(), [], "input")
        for rule in chain:
            at = _append(nodes, rule, [at], type(model).__name__)
        return Program(nodes, at)
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many kinds on data-dependent or untraceable forwards
        raise ValueError(
            f"analytic_ntk: could not read {type(model).__name__}'s forward by tracing it with "
            f"torch.fx ({type(exc).__name__}: {exc}). The forward must be a fixed composition "
            f"of supported layers, without control flow on tensor values.") from exc
    nodes: List[Node] = []
    index: dict = {}
    seen_modules: dict = {}
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    required = [n for n in inputs if not n.args]
    if len(required) != 1:
        raise ValueError(f"analytic_ntk: the forward must take one tensor argument, "
                         f"{type(model).__name__}.forward takes {len(required)}.")
    output = None
    for fx_node in graph.nodes:
        if fx_node.op == "placeholder":
            if fx_node is required[0]:
                index[fx_node] = _append(nodes, Input(), [], "input")
            continue
        if fx_node.op == "output":
            output = fx_node.args[0]
            break
        if fx_node.op == "get_attr" and not fx_node.users:
            continue   # a parameter looked at while choosing leaves, not used by the forward
        if fx_node.op == "get_attr":
            raise ValueError(f"analytic_ntk: the forward reads the tensor {fx_node.target!r} "
                             f"directly; only the layers' own use of their parameters is "
                             f"supported. {registry.SUPPORTED}.")
        args = [_Ref(index[a]) if isinstance(a, torch.fx.Node) and a in index else a
                for a in fx_node.args]
        for a in fx_node.args:
            if isinstance(a, torch.fx.Node) and a not in index:
                raise ValueError(f"analytic_ntk: {fx_node.format_node()} uses {a.name}, "
                                 f"which is not a network value.")
        if any(isinstance(v, torch.fx.Node) for v in fx_node.kwargs.values()):
            raise ValueError(f"analytic_ntk: {fx_node.format_node()} passes a network value "
                             f"as a keyword argument, which is not supported.")
        if fx_node.op == "call_module":
            module = model.get_submodule(fx_node.target)
            label = f"{fx_node.target} ({type(module).__name__})"
            if id(module) in seen_modules:
                raise ValueError(
                    f"analytic_ntk: the module {label} is called more than once (also as "
                    f"{seen_modules[id(module)]}); shared weights have no infinite-width rule "
                    f"here. Use torch_ntk.monte_carlo_ntk for such networks.")
            seen_modules[id(module)] = label
            chain = registry.module_rules(module, label)
            if chain is None:
                raise ValueError(registry.unsupported(module, fx_node.target))
            operands = [int(a) for a in args if isinstance(a, _Ref)]
            if len(operands) != 1 or len(args) != 1 or fx_node.kwargs:
                raise ValueError(f"analytic_ntk: the module {label} is called with "
                                 f"{len(args)} arguments; layers take one tensor.")
        else:
            label = f"{fx_node.name} ({_describe(fx_node.target)})"
            chain = registry.function_rules(fx_node.target, args, fx_node.kwargs, label,
                                            lambda a: isinstance(a, _Ref))
            if chain is None:
                raise ValueError(
                    f"analytic_ntk: the operation {fx_node.format_node()} in "
                    f"{type(model).__name__}.forward has no infinite-width rule. "
                    f"Supported: {registry.SUPPORTED}.")
            operands = [int(a) for a in args if isinstance(a, _Ref)]
        at = operands
        for rule in chain:
            at = [_append(nodes, rule, at, label)]
        index[fx_node] = at[0]
    if not isinstance(output, torch.fx.Node) or output not in index:
        raise ValueError(f"analytic_ntk: {type(model).__name__}.forward must return one tensor "
                         f"computed from its input, got {output!r}.")
    return Program(nodes, index[output])


def mlp(depth: int, in_features: int, activation: Rule, w_std: float, b_std: float) -> Program:
    """The program of the ``depth``-layer fully-connected network of ``analytic_ntk(x, ...)``."""
    nodes: List[Node] = []
    at = _append(nodes, Input(), [], "input")
    for layer in range(depth):
        if layer:
            at = _append(nodes, activation, [at], f"activation {layer}")
        at = _append(nodes, Dense(in_features if layer == 0 else None, w_std, b_std,
                                  f"layer {layer}"), [at], f"layer {layer}")
    return Program(nodes, at)


def plan(program: Program, input_shape: Sequence[int]) -> Program:
    """Static shapes, odd/ancestor sets and position layouts for inputs (N, *input_shape);
    ValueError for layers that don't fit or sums that aren't independent."""
    if len(input_shape) < 1:
        raise ValueError("analytic_ntk: inputs must have a channel (feature) axis: shape "
                         "(N, C, *spatial) or (N, features).")
    program.input_shape = tuple(input_shape)
    for i, node in enumerate(program.nodes):
        rule = node.rule
        if isinstance(rule, Input):
            node.shape = Shape(channels=input_shape[0], spatial=tuple(input_shape[1:]))
            continue
        ins = [program.nodes[j] for j in node.inputs]
        node.shape = rule.shape([n.shape for n in ins])
        ancestors = frozenset().union(*(n.ancestors for n in ins))
        if isinstance(rule, (Dense, Conv)):
            node.odd = frozenset({i}) | (ins[0].odd if rule.b2 == 0 else frozenset())
            node.ancestors = ancestors | {i}
            continue
        node.ancestors = ancestors
        if isinstance(rule, Add):
            _check_independent(node, ins)
            node.odd = frozenset.intersection(*(n.odd for n in ins))
        elif isinstance(rule, LayerNorm):
            if not ins[0].odd:
                raise ValueError(
                    f"analytic_ntk: {node.label}: LayerNorm is supported where its input has "
                    f"zero mean over the channels at infinite width (e.g. right after an NTK "
                    f"linear or conv layer, or after erf/tanh of one); here it follows "
                    f"{ins[0].label}.")
            node.odd = ins[0].odd
        elif isinstance(rule, Activation):
            node.odd = ins[0].odd if rule.odd else frozenset()
        elif rule.linear:
            node.odd = ins[0].odd
    out = program.nodes[program.output]
    if out.shape.positions > 1:
        raise ValueError(f"analytic_ntk: the network's output has spatial shape "
                         f"{out.shape.spatial}; its entries are not identically distributed. "
                         f"End with a dense layer (after nn.Flatten()) or global average "
                         f"pooling.")
    _layouts(program)
    _fusions(program)
    return program


def _fusions(program: Program) -> None:
    """Inputs read only by convolutions; convolutions whose only consumer is a closed-form
    activation (the native core computes the two in one pass), and activations of features whose only consumer is a dense layer
    (the layer's scaling is folded into the activation's last products)."""
    consumers: dict = {}
    for i, node in enumerate(program.nodes):
        for j in node.inputs:
            consumers.setdefault(j, []).append(i)
    program.fusions, program.dense_fusions = {}, {}
    program.patched_inputs = frozenset(
        i for i, node in enumerate(program.nodes)
        if isinstance(node.rule, Input) and i != program.output and consumers.get(i)
        and all(isinstance(program.nodes[u].rule, Conv) for u in consumers[i]))
    for i, node in enumerate(program.nodes):
        users = consumers.get(i, [])
        if i == program.output or len(users) != 1:
            continue
        user = program.nodes[users[0]]
        if isinstance(node.rule, Conv) and isinstance(user.rule, ClosedForm):
            program.fusions[i] = users[0]
        elif (isinstance(node.rule, Activation) and isinstance(user.rule, Dense)
              and not node.shape.spatial):
            program.dense_fusions[i] = users[0]


def _layouts(program: Program) -> None:
    """Marks the nodes that must hold all position pairs, from the output back."""
    need = [False] * len(program.nodes)
    for i in range(len(program.nodes) - 1, -1, -1):
        node = program.nodes[i]
        node.full = need[i] and node.shape.positions > 1
        for k, j in enumerate(node.inputs):
            need[j] = need[j] or node.rule.input_full(need[i], k)


def _check_independent(node: Node, ins: Sequence[Node]) -> None:
    for a in range(len(ins)):
        for b in range(a + 1, len(ins)):
            x, y = ins[a], ins[b]
            if not (x.odd - y.ancestors or y.odd - x.ancestors):
                raise ValueError(
                    f"analytic_ntk: {node.label} adds {x.label} and {y.label}, whose "
                    f"covariance doesn't vanish at infinite width: a sum is supported when one "
                    f"of each two branches ends in an NTK layer (linear or conv, possibly "
                    f"followed by pooling, erf, tanh or LayerNorm) that the other branch "
                    f"doesn't use, as in x + block(x) with block ending in a conv.")


def _check_untouched(model: nn.Module) -> None:
    """The rules read the layers' definitions, not their forward: hooks (which may change what
    a layer computes) and parametrisations (which change its weights' distribution) would be
    ignored, so they are refused."""
    from torch.nn.modules import module as base
    from torch.nn.utils import parametrize
    if base._global_forward_hooks or base._global_forward_pre_hooks:
        raise ValueError("analytic_ntk: global forward hooks are registered; the infinite-width "
                         "kernel is read from the layers' definitions and would ignore them. "
                         "Remove them for the call.")
    for name, m in model.named_modules():
        label = name or type(model).__name__
        if m._forward_hooks or m._forward_pre_hooks:
            raise ValueError(f"analytic_ntk: the module {label} ({type(m).__name__}) has forward "
                             f"hooks; the infinite-width kernel is read from the layers' "
                             f"definitions and would ignore what they change. Remove them for "
                             f"the call.")
        if parametrize.is_parametrized(m):
            raise ValueError(f"analytic_ntk: the module {label} ({type(m).__name__}) is "
                             f"parametrised; its weights are no longer the N(0, 1) of the NTK "
                             f"parameterisation. Use torch_ntk.monte_carlo_ntk for it.")


class _Ref(int):
    """A network value among an operation's arguments: its node's index (an int constant such
    as the 1 of ``torch.flatten(x, 1)`` stays an int)."""


def _append(nodes: List[Node], rule: Rule, inputs: List[int], label: str) -> int:
    nodes.append(Node(rule, list(inputs), label))
    return len(nodes) - 1


def _entries(node: Node) -> int:
    p = node.shape.positions if node.shape is not None else 1
    return p * p if node.full else p


def _describe(target) -> str:
    return target if isinstance(target, str) else getattr(target, "__qualname__", repr(target))


class _Tracer(torch.fx.Tracer):
    """Keeps supported layers and torch.nn's own modules as leaves (so unsupported ones are
    named), traces through the user's container modules."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        if isinstance(m, NTKMLP) or registry.module_rules(m, qualname) is not None:
            return True
        return type(m).__module__.startswith("torch.nn") or super().is_leaf_module(m, qualname)
