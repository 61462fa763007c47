"""Property-based: random module graphs give the reference kernel or a clear refusal.

Each example builds a network from random pieces (Linear over the last axis, Conv1d over the
sequence, LayerNorm, GroupNorm, activations, residual blocks, multi-head attention, axis
permutations, and hostile pieces that reorder or mix the batch) with random sizes, and checks
every method against the torch.func reference: the same kernel, or a ValueError/TypeError; never
a different number and never another exception. ``TORCH_NTK_FUZZ_EXAMPLES`` sets the budget
(small by default; e.g. 500 on demand).
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import torch_ntk
from conftest import assert_close

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("TORCH_NTK_FUZZ_EXAMPLES", "12"))
PIECES = ("linear", "act", "layernorm", "groupnorm", "residual", "attention", "conv",
          "transpose_linear", "flip_batch", "batch_mean")
HOSTILE_INTERACTION = {"batch_mean"}


class Piece(nn.Module):
    """One random piece acting on (N, T, d) -> (N, T, d')."""

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
        elif kind in ("flip_batch", "batch_mean"):
            self.f = nn.Linear(d, d)

    def forward(self, x):
        k = self.kind
        if k in ("linear", "act", "layernorm", "groupnorm"):
            return self.f(x)
        if k == "residual":
            return x + self.f(x)
        if k == "attention":
            return self.f(x, x, x, need_weights=False)[0]
        if k == "conv":
            return self.f(x.transpose(1, 2)).transpose(1, 2)
        if k == "transpose_linear":
            return self.f(x.transpose(1, 2)).transpose(1, 2)
        if k == "flip_batch":
            return self.f(x.flip(0)).flip(0)
        return self.f(x) - self.f(x).mean(0)          # batch_mean: samples interact


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
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, k)

    def forward(self, x):
        return self.head(self.body(x).mean(1))


@st.composite
def cases(draw):
    kinds = draw(st.lists(st.sampled_from(PIECES), min_size=1, max_size=4))
    return dict(kinds=kinds, t=draw(st.integers(1, 4)), d=draw(st.sampled_from([2, 4, 6])),
                k=draw(st.integers(1, 3)), heads=draw(st.sampled_from([1, 2])),
                n1=draw(st.integers(1, 6)), n2=draw(st.one_of(st.none(), st.integers(1, 4))),
                mode=draw(st.sampled_from(["full", "trace", "diagonal"])),
                batch_size=draw(st.one_of(st.none(), st.integers(1, 4))),
                seed=draw(st.integers(0, 2 ** 16)))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_random_graphs_are_exact_or_refused(case):
    torch.manual_seed(case["seed"])
    model = Net(case["kinds"], case["t"], case["d"], case["k"], case["heads"]).double().eval()
    x1 = torch.randn(case["n1"], case["t"], case["d"], dtype=torch.float64)
    x2 = None if case["n2"] is None else torch.randn(case["n2"], case["t"], case["d"],
                                                     dtype=torch.float64)
    kw = dict(mode=case["mode"], batch_size=case["batch_size"])
    interacts = any(k in HOSTILE_INTERACTION for k in case["kinds"])
    try:
        ref = torch_ntk.empirical_ntk(model, x1, x2, method="jacobian", **kw)
    except ValueError as exc:
        assert interacts, f"jacobian refused a model whose samples don't interact: {exc}"
        ref = None
    if interacts:
        assert ref is None, "samples interact but the jacobian method gave a result"
    for method in ("auto", "structured"):
        try:
            got = torch_ntk.empirical_ntk(model, x1, x2, method=method, **kw)
        except (ValueError, TypeError):
            assert method == "structured" or ref is None, "auto refused a model jacobian handles"
            continue
        assert ref is not None, f"{method} gave a number where the reference refused"
        assert_close(got, ref, torch.float64, f"{method} on {case}")
