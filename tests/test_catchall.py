"""The catch-all rule (rules/local.py): modules called with nested tensors (tuples, lists,
dicts), sparse Embedding gradients, and Embedding tables whose backward counts tokens.

Each case is checked twice: through ``empirical_ntk`` (with its checks of every block) and on
the structured engine alone (plan, factors, contract), which is the rule's arithmetic only.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torch_ntk
from conftest import assert_close, autograd_ntk
from torch_ntk.empirical.structured import StructuredNTK

DTYPE = torch.float64


class CellLoop(nn.Module):
    """nn.LSTMCell in a Python loop over 3 steps, its state passed as a tuple ``(h, c)``."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = x.reshape(x.shape[0], 3, 3)
        h = c = x.new_zeros(x.shape[0], 4)
        for t in range(3):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h)


class StatefulLSTM(nn.Module):
    """nn.LSTM(x, (h0, c0)) with 2 layers, the initial state computed from the first step."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.init = nn.Linear(3, 16)
        self.rnn = nn.LSTM(3, 4, num_layers=2, batch_first=batch_first)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        n = x.shape[0]
        x = x.reshape(n, 3, 3)
        h0, c0 = torch.tanh(self.init(x[:, 0])).reshape(n, 2, 2, 4).permute(1, 2, 0, 3)
        if not self.rnn.batch_first:
            x = x.transpose(0, 1)
        y, (h, c) = self.rnn(x, (h0.contiguous(), c0.contiguous()))
        return self.head(y.mean(1 if self.rnn.batch_first else 0) + c[-1])


class ListMix(nn.Module):
    """Takes a list ``[x (N, 3), h (N, 6), shift (4,)]``; the shift is shared by all samples."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))
        self.v = nn.Parameter(torch.randn(6, 4))
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, parts):
        x, h, shift = parts
        return torch.tanh(x @ self.w + shift) * (h @ self.v) + self.b


class ListModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(3, 6)
        self.mix = ListMix()
        self.head = nn.Linear(4, 2)
        self.register_buffer("shift", torch.randn(4))

    def forward(self, x):
        return self.head(self.mix([x, torch.tanh(self.pre(x)), self.shift]))


class DictGate(nn.Module):
    """Takes ``extra={"shift": (N, 4), "gate": (4,) shared, "power": int}`` by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))
        self.u = nn.Parameter(torch.randn(4))

    def forward(self, x, *, extra):
        z = torch.tanh(x @ self.w + extra["shift"] * self.u)
        return z ** extra["power"] * extra["gate"]


class DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(3, 4)
        self.gate = DictGate()
        self.head = nn.Linear(4, 2)
        self.register_buffer("g", torch.rand(4))

    def forward(self, x):
        extra = {"shift": torch.sin(self.pre(x)), "gate": self.g, "power": 3}
        return self.head(self.gate(x, extra=extra))


class SubEmbedding(nn.Embedding):
    """An Embedding subclass: not the token rule's, so the catch-all rule takes it."""


class TokenModel(nn.Module):
    """Tokens (N, 6) from a vocabulary of 7 through a table, then a Linear head."""

    def __init__(self, table: nn.Module) -> None:
        super().__init__()
        self.table = table
        self.head = nn.Linear(3 if isinstance(table, nn.EmbeddingBag) else 18, 2)

    def forward(self, idx):
        return self.head(torch.tanh(self.table(idx).flatten(1)))


class TokenLSTM(nn.Module):
    """A token-counting Embedding feeding an nn.LSTM (which torch.func can't vmap)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(7, 3, scale_grad_by_freq=True)
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, idx):
        return self.head(self.rnn(self.table(idx))[0].mean(1))


def _tokens(n: int) -> torch.Tensor:
    return torch.randint(0, 7, (n, 6))


def _floats(width: int):
    return lambda n: torch.randn(n, width, dtype=DTYPE)


# name -> (model factory, inputs (n) -> Tensor, the layer the catch-all rule must take)
CASES = {
    "lstm_cell_loop": (CellLoop, _floats(9), "cell"),
    "lstm_state_batch_first": (lambda: StatefulLSTM(True), _floats(9), "rnn"),
    "lstm_state_seq_first": (lambda: StatefulLSTM(False), _floats(9), "rnn"),
    "list_argument": (ListModel, _floats(3), "mix"),
    "dict_kwarg": (DictModel, _floats(3), "gate"),
    "embedding_sparse": (lambda: TokenModel(nn.Embedding(7, 3, sparse=True)), _tokens, None),
    "embedding_sparse_local": (lambda: TokenModel(SubEmbedding(7, 3, sparse=True)), _tokens,
                               "table"),
    "embedding_bag_sparse": (lambda: TokenModel(nn.EmbeddingBag(7, 3, sparse=True)), _tokens,
                             "table"),
    "embedding_freq": (lambda: TokenModel(nn.Embedding(7, 3, scale_grad_by_freq=True)),
                       _tokens, "table"),
    "embedding_bag_freq": (lambda: TokenModel(nn.EmbeddingBag(7, 3, mode="sum",
                                                              scale_grad_by_freq=True)),
                           _tokens, "table"),
    "embedding_freq_lstm": (TokenLSTM, _tokens, "table"),
}

# Refused with a ValueError by (case, method): no autograd mode computes J r through
# _embedding_bag with sparse gradients (no forward-AD formula, no double backward), so
# method="structured" can't check its factors ("auto" takes plain autograd instead).
REFUSED = {("embedding_bag_sparse", "structured"): "can't check its factors"}


def _params(names, methods):
    """(name, method) pairs."""
    return [pytest.param(name, method, id=f"{name}-{method}")
            for name in names for method in methods]


def _case(name: str):
    factory, inputs, local = CASES[name]
    model = factory().to(DTYPE)
    return model, inputs(4), inputs(3), local


def _reference(model: nn.Module, x1, x2):
    """Per-sample autograd on a twin with dense Embedding gradients (the same kernel)."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            module.sparse = False
    return autograd_ntk(twin, x1, x1 if x2 is None else x2)


def _engine(model: nn.Module, probe) -> StructuredNTK:
    """The structured engine planned on a probe batch (its size must be no other axis' size)."""
    engine = StructuredNTK(model, dict(model.named_parameters()))
    engine.plan(probe)
    return engine


def _engine_ntk(engine: StructuredNTK, x1, x2):
    """The engine's kernel from its factors, without empirical_ntk's checks."""
    f1 = engine.factors(x1)
    f2 = f1 if x2 is None else engine.factors(x2)
    n2 = x1.shape[0] if x2 is None else x2.shape[0]
    out = torch.empty(x1.shape[0], n2, 2, 2, dtype=DTYPE)
    return engine.contract(f1, f2, "full", out, symmetric=x2 is None)


@pytest.mark.parametrize("name", sorted(CASES))
def test_catchall_takes_the_layer(name):
    factory, inputs, local = CASES[name]
    if local is not None:
        rules = {l.name: l.rule.name for l in _engine(factory().to(DTYPE), inputs(11)).layers}
        assert rules.get(local) == "local", f"{name}: {local} planned as {rules}"


@pytest.mark.parametrize("distinct", [False, True], ids=["x2_none", "x2"])
@pytest.mark.parametrize("name, method", _params(sorted(CASES), ["engine"]))
def test_engine_matches_autograd(name, method, distinct):
    inputs = CASES[name][1]
    model, x1, x2, _ = _case(name)
    x2 = x2 if distinct else None
    got = _engine_ntk(_engine(model, inputs(11)), x1, x2)
    assert_close(got, _reference(model, x1, x2), DTYPE, f"{name} engine")


@pytest.mark.parametrize("distinct", [False, True], ids=["x2_none", "x2"])
@pytest.mark.parametrize("name, method", _params(sorted(CASES), ["structured", "auto"]))
def test_catchall_matches_autograd(name, method, distinct):
    model, x1, x2, _ = _case(name)
    x2 = x2 if distinct else None
    if (name, method) in REFUSED:
        with pytest.raises(ValueError, match=REFUSED[name, method]):
            torch_ntk.empirical_ntk(model, x1, x2, mode="full", method=method)
        return
    got = torch_ntk.empirical_ntk(model, x1, x2, mode="full", method=method)
    assert_close(got, _reference(model, x1, x2), DTYPE, f"{name} {method}")


_COUNTED = ["embedding_freq", "embedding_bag_freq", "embedding_freq_lstm"]


@pytest.mark.parametrize("name, method", _params(_COUNTED, ["structured", "auto", "jacobian"]))
def test_token_counts_are_per_sample(name, method):
    """With scale_grad_by_freq the gradient scales by the token counts of each sample alone,
    whatever else shares its batch (tokens repeat within and across samples)."""
    model, _, _, _ = _case(name)
    x = torch.tensor([[1, 1, 1, 2, 3, 1], [1, 4, 4, 4, 5, 6], [0, 1, 0, 1, 0, 1],
                      [6, 6, 6, 6, 6, 6], [2, 3, 4, 5, 6, 0]])
    one = torch_ntk.empirical_ntk(model, x, mode="full", method=method, batch_size=1)
    five = torch_ntk.empirical_ntk(model, x, mode="full", method=method, batch_size=5)
    assert_close(one, _reference(model, x, None), DTYPE, f"{name} {method} batch_size 1")
    assert_close(five, one, DTYPE, f"{name} {method} batch_size 5 vs 1")
