"""Models called as their users call them: inputs that are a tuple (``model(*x)``) or a dict
(``model(**x)``) of batch-first tensors, an ``output`` selector applied to what the model
returns, and the pseudo-NTK's single output ``Σ_a f_a / sqrt(K)``.

The engines take one tensor of inputs and a model returning one tensor. ``adapt`` gives them
``Called``, a module around the user's model whose input is a tensor of sample indices into
the stored tuple or dict (x1's samples first, then x2's) and whose output is the selected
tensor; the model's parameters appear under ``model.`` (``prefix``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils import _pytree

PREFIX = "model."


class Called(nn.Module):
    """``output(model(*args))`` / ``output(model(**kwargs))`` of the samples ``idx``.

    Args:
        model: the user's module (registered as ``self.model``).
        store: None (the input is the tensor itself), or the tuple or dict of the inputs of
            every sample (x1's, then x2's) with the non-tensor values as given.
        batched: the keys (tuple positions or dict keys) of ``store`` that hold batch tensors.
        output: a callable on what the model returns, or None (all its tensors, flattened per
            sample and concatenated).
        pseudo: return ``Σ_a f_a / sqrt(K)`` (N, 1), the pseudo-NTK's output.
    """

    def __init__(self, model: nn.Module, store, batched: tuple, output: Optional[Callable],
                 pseudo: bool) -> None:
        super().__init__()
        self.model = model
        self._store = [store]      # a list: not registered as buffers or submodules
        self._batched, self._output, self._pseudo = frozenset(batched), output, pseudo

    def forward(self, x: Tensor) -> Tensor:
        store = self._store[0]
        if store is None:
            out = self.model(x)
        elif isinstance(store, dict):
            out = self.model(**{k: (v[x] if k in self._batched else v) for k, v in store.items()})
        else:
            out = self.model(*[(v[x] if i in self._batched else v) for i, v in enumerate(store)])
        f = selected(out, self._output, x.shape[0])
        if self._pseudo:
            f = f.reshape(f.shape[0], -1)
            f = f.sum(1, keepdim=True) / math.sqrt(f.shape[1])
        return f


def needed(x1, output, pseudo: bool) -> bool:
    """Whether the call needs ``Called`` (else the model and tensors go to the engines as
    they are)."""
    return not isinstance(x1, Tensor) or output is not None or pseudo


def adapt(model: nn.Module, x1, x2, output, pseudo: bool, device_of: Tensor
          ) -> Tuple[Called, Tensor, Optional[Tensor]]:
    """``(Called, x1', x2')``: the module the engines see and its inputs (x2' None when x2 is).

    Tensor inputs stay tensors; tuple and dict inputs become sample indices (on the inputs'
    device). ValueError/TypeError for inputs that don't fit the contract.
    """
    if output is not None and not callable(output):
        raise TypeError(f"empirical_ntk: output must be a callable applied to what the model "
                        f"returns (e.g. lambda o: o.logits[:, -1]), got {type(output).__name__}.")
    if isinstance(x1, Tensor):
        if x2 is not None and not isinstance(x2, Tensor):
            raise TypeError(f"empirical_ntk: x1 is a tensor but x2 is a "
                            f"{type(x2).__name__}; pass both the same way.")
        return Called(model, None, (), output, pseudo), x1, x2
    store, batched, n1, n2 = _stored(x1, x2, device_of)
    device = store[batched[0]].device
    idx1 = torch.arange(n1, device=device)
    idx2 = None if x2 is None else torch.arange(n1, n1 + n2, device=device)
    return Called(model, store, batched, output, pseudo), idx1, idx2


def selected(out: Any, output: Optional[Callable], n: int) -> Tensor:
    """The tensor whose kernel is taken from what the model returned (``n`` samples)."""
    if output is not None:
        f = output(out)
        if not isinstance(f, Tensor):
            raise TypeError(f"empirical_ntk: output(...) must return a tensor, got "
                            f"{type(f).__name__}.")
        if f.dim() < 1 or f.shape[0] != n:
            raise ValueError(f"empirical_ntk: output(...) gave a tensor of shape "
                             f"{tuple(f.shape)} for a batch of {n} inputs; it must keep the "
                             f"batch first (e.g. o.logits[:, -1], not o.logits.mean(0)).")
        return f
    if isinstance(out, Tensor):
        return out
    leaves = [t for t in _pytree.tree_leaves(out) if isinstance(t, Tensor)]
    if not leaves:
        raise TypeError(f"empirical_ntk: the model returned a {type(out).__name__} with no "
                        f"tensors; pass output= to pick the tensor whose kernel is taken.")
    odd = [tuple(t.shape) for t in leaves if t.dim() < 1 or t.shape[0] != n]
    if odd:
        raise ValueError(f"empirical_ntk: the model returned a {type(out).__name__} whose "
                         f"tensors are not all batch-first with {n} samples (shapes {odd}); "
                         f"pass output= to pick the tensor whose kernel is taken, e.g. "
                         f"output=lambda o: o.logits.")
    return torch.cat([t.reshape(n, -1) for t in leaves], 1)


def user_name(name: str) -> str:
    """A parameter or module name of ``Called`` as the user's model names it."""
    return name[len(PREFIX):] if name.startswith(PREFIX) else ("" if name == "model" else name)


# Internal helpers

def _stored(x1, x2, device_of: Tensor):
    """The concatenated store of a tuple or dict input, its batched keys and N1, N2."""
    if not isinstance(x1, (tuple, list, dict)):
        raise TypeError(f"empirical_ntk: x1 must be a torch.Tensor, a tuple of tensors (the "
                        f"model is called as model(*x1)) or a dict (model(**x1)); got "
                        f"{type(x1).__name__}.")
    if x2 is not None and (isinstance(x2, dict) != isinstance(x1, dict)
                           or not isinstance(x2, (tuple, list, dict))):
        raise TypeError(f"empirical_ntk: x1 is a {type(x1).__name__} but x2 is a "
                        f"{type(x2).__name__}; pass both the same way.")
    items1 = _items(x1)
    items2 = None if x2 is None else _items(x2)
    if items2 is not None and [k for k, _ in items1] != [k for k, _ in items2]:
        raise ValueError(f"empirical_ntk: x1 and x2 must have the same "
                         f"{'keys' if isinstance(x1, dict) else 'length'}; got "
                         f"{[k for k, _ in items1]} and {[k for k, _ in items2]}.")
    batched = [k for k, v in items1 if isinstance(v, Tensor)]
    if not batched:
        raise TypeError(f"empirical_ntk: x1 must be a torch.Tensor, or a tuple or dict holding "
                        f"the batch's tensors; got a {type(x1).__name__} with no tensor.")
    n1 = _batch_size(items1, "x1")
    n2 = None if items2 is None else _batch_size(items2, "x2")
    values = {}
    for i, (key, v) in enumerate(items1):
        w = None if items2 is None else items2[i][1]
        label = f"x1[{key!r}]"
        if isinstance(v, Tensor):
            _check_tensor(v, label, device_of)
            if w is not None:
                if not isinstance(w, Tensor):
                    raise ValueError(f"empirical_ntk: {label} is a tensor but x2[{key!r}] is a "
                                     f"{type(w).__name__}.")
                _check_tensor(w, f"x2[{key!r}]", device_of)
                if w.shape[1:] != v.shape[1:] or w.dtype != v.dtype:
                    raise ValueError(f"empirical_ntk: x1[{key!r}] and x2[{key!r}] must match "
                                     f"after the batch dimension and in dtype; got "
                                     f"{tuple(v.shape)} {v.dtype} and {tuple(w.shape)} "
                                     f"{w.dtype}.")
                v = torch.cat([v, w])
        elif w is not None and not _same_constant(v, w):
            raise ValueError(f"empirical_ntk: x1[{key!r}] and x2[{key!r}] are not tensors and "
                             f"differ ({v!r} and {w!r}); values that are not batch tensors are "
                             f"passed to every call as they are, so they must be the same.")
        values[key] = v
    store = values if isinstance(x1, dict) else tuple(values[i] for i in range(len(items1)))
    return store, tuple(batched), n1, (0 if n2 is None else n2)


def _items(x) -> list:
    return list(x.items()) if isinstance(x, dict) else list(enumerate(x))


def _batch_size(items, name: str) -> int:
    sizes = {k: (v.shape[0] if v.dim() else None) for k, v in items if isinstance(v, Tensor)}
    if any(s is None for s in sizes.values()) or len(set(sizes.values())) != 1:
        raise ValueError(f"empirical_ntk: every tensor in {name} must be batch-first with the "
                         f"same number of samples; got first dimensions {sizes}.")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError(f"empirical_ntk: {name} has no samples.")
    return n


def _check_tensor(v: Tensor, label: str, device_of: Tensor) -> None:
    if v.device != device_of.device:
        raise ValueError(f"empirical_ntk: {label} is on {v.device} but the model's parameters "
                         f"are on {device_of.device}.")
    if v.is_complex():
        raise ValueError(f"empirical_ntk: {label} is complex; pass real tensors.")
    if v.is_floating_point() and not bool(torch.isfinite(v).all()):
        raise ValueError(f"empirical_ntk: {label} contains NaN or infinite values.")


def _same_constant(a, b) -> bool:
    try:
        return a is b or bool(a == b)
    except Exception:   # an object without a plain equality
        return False
