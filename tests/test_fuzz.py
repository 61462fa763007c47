"""Property-based: random module graphs give the reference kernel or a clear refusal.

Each example builds a network from random pieces (Linear over the last axis, Conv1d over the
sequence, LayerNorm, GroupNorm, activations, residual blocks, multi-head attention, axis
permutations) and hostile ones: pieces that reorder or mix the batch, a weight reused through
F.linear or a Python branch only on a rare sample (one sample of x1 or x2, at a random
position, carries the marker), forward hooks and pre-hooks, a checkpointed region, a module
taking a tuple. Every method is checked against per-sample autograd on each sample alone: the
same kernel, or a ValueError/TypeError; never a different number and never another exception.
``TORCH_NTK_FUZZ_EXAMPLES`` sets the budget (200 by default; e.g. 2000 on demand).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import torch_ntk
from conftest import assert_close, autograd_ntk

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("TORCH_NTK_FUZZ_EXAMPLES", "200"))
PIECES = ("linear", "act", "layernorm", "groupnorm", "residual", "attention", "conv",
          "transpose_linear", "flip_batch", "batch_mean", "rare_reuse", "rare_branch",
          "hooked", "checkpoint", "pair", "rare_mean")
HOSTILE_INTERACTION = {"batch_mean"}      # always refused
MAYBE_INTERACTION = {"rare_mean"}         # refused when the rare sample shares a block
RARE = 5.0                                # the marker: feature (0, 0) of the rare sample


class Pair(nn.Module):
    """A module called with a tuple: its parameter acts on both members."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, pair):
        a, b = pair
        return a * self.w + torch.tanh(b) * self.w


class Piece(nn.Module):
    """One random piece acting on (N, T, d) -> (N, T, d'); ``gate`` (N, 1, 1) marks the rare
    sample."""

    def __init__(self, kind: str, t: int, d: int, d_out: int, heads: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "linear":
            self.f = nn.Linear(d, d_out)
        elif kind == "act":
            self.f = nn.Tanh()
        elif kind == "layernorm":
            self.f = nn.LayerNorm(d)
        elif kind == "groupnorm":
            self.f = nn.GroupNorm(1, t)
        elif kind == "residual":
            self.f = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        elif kind == "attention":
            self.f = nn.MultiheadAttention(d, heads, batch_first=True)
        elif kind == "conv":
            self.f = nn.Conv1d(d, d_out, 3, padding=1)
        elif kind == "transpose_linear":
            self.f = nn.Linear(t, t)
        elif kind == "checkpoint":
            self.f = nn.Sequential(nn.Linear(d, d), nn.Tanh())
        elif kind == "pair":
            self.f = Pair(d)
        else:
            self.f = nn.Linear(d, d)
        if kind == "hooked":
            self.f.register_forward_pre_hook(lambda m, args: (2.0 * args[0],))
            self.f.register_forward_hook(lambda m, args, out: out + 0.5 * args[0])

    def forward(self, x, gate):
        k = self.kind
        if k in ("linear", "act", "layernorm", "groupnorm", "hooked"):
            return self.f(x)
        if k == "residual":
            return x + self.f(x)
        if k == "attention":
            return self.f(x, x, x, need_weights=False)[0]
        if k in ("conv", "transpose_linear"):
            return self.f(x.transpose(1, 2)).transpose(1, 2)
        if k == "flip_batch":
            return self.f(x.flip(0)).flip(0)
        if k == "batch_mean":
            return self.f(x) - self.f(x).mean(0)          # samples interact
        if k == "rare_mean":
            return self.f(x) + gate * x.mean(0)           # only through the rare sample
        if k == "rare_reuse":
            return self.f(x) + gate * F.linear(x, self.f.weight)
        if k == "rare_branch":
            if bool(gate.any()):  # a second call of f, kept by the rare sample only
                return torch.where(gate > 0, torch.tanh(self.f(self.f(x))), torch.tanh(self.f(x)))
            return torch.tanh(self.f(x))
        if k == "checkpoint":
            return checkpoint(self.f, x, use_reentrant=False)
        return self.f((x, x.flip(-1)))                    # pair


class Net(nn.Module):
    def __init__(self, kinds, t, d, k, heads):
        super().__init__()
        layers, width = [], d
        for kind in kinds:
            out = width + 1 if kind in ("linear", "conv") else width
            if kind == "attention" and width % heads:
                kind = "act"
            layers.append(Piece(kind, t, width, out, heads))
            width = out
        self.body = nn.ModuleList(layers)
        self.head = nn.Linear(width, k)

    def forward(self, x):
        gate = (x[:, :1, :1] > RARE - 1).to(x.dtype)
        for piece in self.body:
            x = piece(x, gate)
        return self.head(x.mean(1))


@st.composite
def cases(draw):
    kinds = draw(st.lists(st.sampled_from(PIECES), min_size=1, max_size=4))
    return dict(kinds=kinds, t=draw(st.integers(1, 4)), d=draw(st.sampled_from([2, 4, 6])),
                k=draw(st.integers(1, 3)), heads=draw(st.sampled_from([1, 2])),
                n1=draw(st.integers(1, 6)), n2=draw(st.one_of(st.none(), st.integers(1, 4))),
                rare=draw(st.one_of(st.none(), st.tuples(st.sampled_from(["x1", "x2"]),
                                                         st.integers(0, 5)))),
                mode=draw(st.sampled_from(["full", "trace", "diagonal"])),
                batch_size=draw(st.one_of(st.none(), st.integers(1, 4))),
                seed=draw(st.integers(0, 2 ** 16)))


def _inputs(case):
    """x1, x2 (None or a batch), no marker except on the rare sample when there is one."""
    shape = (case["t"], case["d"])
    x1 = torch.randn(case["n1"], *shape, dtype=torch.float64)
    x2 = None if case["n2"] is None else torch.randn(case["n2"], *shape, dtype=torch.float64)
    for x in (x1, x2):
        if x is not None:
            x[:, 0, 0] = x[:, 0, 0].clamp(-2, 2)
    if case["rare"] is not None:
        side, index = case["rare"]
        x = x2 if side == "x2" and x2 is not None else x1
        x[index % x.shape[0], 0, 0] = RARE
    return x1, x2


def _reduce(full, mode):
    diagonal = full.diagonal(dim1=2, dim2=3)
    return {"full": full, "trace": diagonal.sum(-1), "diagonal": diagonal}[mode]


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_random_graphs_are_exact_or_refused(case):
    torch.manual_seed(case["seed"])
    model = Net(case["kinds"], case["t"], case["d"], case["k"], case["heads"]).double().eval()
    x1, x2 = _inputs(case)
    ref = _reduce(autograd_ntk(model, x1, x1 if x2 is None else x2), case["mode"])
    kw = dict(mode=case["mode"], batch_size=case["batch_size"])
    interacts = any(k in HOSTILE_INTERACTION for k in case["kinds"])
    maybe = any(k in MAYBE_INTERACTION for k in case["kinds"])
    results = {}
    for method in ("jacobian", "auto", "structured"):
        try:
            results[method] = torch_ntk.empirical_ntk(model, x1, x2, method=method, **kw)
        except (ValueError, TypeError) as exc:
            assert method == "structured" or interacts or maybe, f"{method} refused: {exc}"
            continue
        assert not interacts, f"{method} gave a number for samples that interact"
        assert_close(results[method], ref, torch.float64, f"{method} on {case}")
    if "jacobian" in results:
        assert "auto" in results, "auto refused a model the jacobian method computes"
