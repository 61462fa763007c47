"""Module-tree coverage of the structured method: what it factorises and what it hands over."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_ntk
from torch_ntk.empirical import verify
from torch_ntk.empirical.api import _choose_engine
from torch_ntk.empirical.structured import StructuredNTK
from conftest import assert_close, make


def _check(model, x1, x2=None, batch_size=None):
    for mode in ("full", "trace", "diagonal"):
        ref = torch_ntk.empirical_ntk(model, x1, x2, mode=mode, method="jacobian")
        got = torch_ntk.empirical_ntk(model, x1, x2, mode=mode, method="structured",
                                      batch_size=batch_size)
        assert_close(got, ref, torch.float64, f"structured vs jacobian, mode={mode}")


def _engine(model, x):
    """The structured engine as empirical_ntk plans and checks it."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    engine, _, _ = _choose_engine(model, params, x, None, "structured")
    assert isinstance(engine, StructuredNTK)
    return engine


class FlattenedTokens(nn.Module):
    """Folds the sequence into the batch axis: the Linear never sees the batch first."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Linear(4, 5)
        self.head = nn.Linear(15, 2)

    def forward(self, x):
        n = x.shape[0]
        h = torch.tanh(self.tok(x.reshape(n * 3, 4)))
        return self.head(h.reshape(n, 15))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class ScaledResidual(nn.Module):
    """A bare nn.Parameter, a Linear called twice on 2-D input and an unused layer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.gain = nn.Parameter(torch.tensor([0.7, 1.3, -0.4, 1.0]))
        self.unused = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.sin(self.lin(x))
        h = self.gain * self.lin(h) + x
        return self.head(h)


class CustomLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) ** 2


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 1)

    def forward(self, x):
        h = self.a(x)
        if bool((x.abs() > 10).any()):
            h = self.a(torch.tanh(h))
        return self.b(h)


def test_batch_folded_into_rows_goes_to_jacobian():
    model = FlattenedTokens().double()
    x = torch.randn(7, 12, dtype=torch.float64)
    engine = _engine(model, x)
    assert set(engine.foreign) == {"tok.weight", "tok.bias"}
    _check(model, x, torch.randn(3, 12, dtype=torch.float64), batch_size=3)


def test_tied_weights_are_exact():
    model = Tied().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    engine = _engine(model, x)
    assert set(engine.foreign) == {"a.weight"}  # the tied weight; the biases stay Gram layers
    _check(model, x, batch_size=4)


def test_bare_parameter_repeated_call_and_unused_layer():
    model = ScaledResidual().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    engine = _engine(model, x)
    assert engine.foreign == {}
    assert [(l.name, l.calls, l.gram) for l in engine.layers] == [
        ("<root>", 1, False), ("lin", 2, False), ("head", 1, True)]
    root = engine.layers[0]  # the bare parameter and the never-called layer (exact zeros)
    assert set(root.params) == {"gain", "unused.weight", "unused.bias"}
    _check(model, x, torch.randn(4, 4, dtype=torch.float64), batch_size=5)


def test_subclass_with_custom_forward_gets_per_sample_gradients():
    model = nn.Sequential(CustomLinear(4, 3), nn.Linear(3, 2)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    engine = _engine(model, x)
    assert engine.foreign == {}
    assert [(l.name, l.rule.name) for l in engine.layers] == [("0", "local"), ("1", "linear")]
    _check(model, x)


def test_circular_padding_conv_is_exact():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"), nn.Tanh(),
                          nn.Conv2d(2, 1, 2), nn.Flatten()).double()
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    assert _engine(model, x).foreign == {}
    _check(model, x)


def test_mlp_never_forms_a_jacobian():
    model, x, _ = make("mlp_k10", torch.float64, 6, 1)
    engine = _engine(model, x)
    assert engine.foreign == {} and all(l.gram for l in engine.layers)


def test_frozen_weight_trainable_bias():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    _check(model, torch.randn(5, 4, dtype=torch.float64))


def test_linear_over_several_leading_axes():
    model = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)).double()
    x = torch.randn(4, 2, 5, 3, dtype=torch.float64)
    _check(model, x, torch.randn(3, 2, 5, 3, dtype=torch.float64), batch_size=2)


def test_structure_changing_with_input_is_an_error():
    model = DataDependent().double()
    with pytest.raises(ValueError, match="structure depends on its input"):
        x = torch.randn(8, 4, dtype=torch.float64)
        x[6, 0] = 20.0  # only the second block takes the extra branch
        torch_ntk.empirical_ntk(model, x, batch_size=4, method="structured")


class WeightUsedTwice(nn.Module):
    """The head's weight also enters through F.linear: no per-layer factorisation exists."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head(h) + nn.functional.linear(h * h, self.head.weight)


def test_parameter_used_outside_its_layer():
    model = WeightUsedTwice().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="does not reproduce the model's own gradients"):
        torch_ntk.empirical_ntk(model, x, method="structured")
    ref = torch_ntk.empirical_ntk(model, x, method="jacobian")
    assert_close(torch_ntk.empirical_ntk(model, x), ref, torch.float64, "auto falls back")


def test_linearized_model_and_functional_calls():
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    lin = torch_ntk.linearize(net)
    x = torch.randn(4, 3, dtype=torch.float64)
    ref = torch_ntk.empirical_ntk(net, x, method="jacobian")
    assert_close(torch_ntk.empirical_ntk(lin, x), ref, torch.float64, "auto on linearize()")


def test_pending_backward_survives_a_kernel_call():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double().eval()
    x = torch.randn(5, 3, dtype=torch.float64)
    loss = model(x).sum()
    torch_ntk.empirical_ntk(model, x, mode="trace")
    loss.backward()
    assert model[0].weight.grad is not None


@pytest.mark.parametrize("conv, shape", [
    (lambda: nn.Conv1d(4, 6, 3, stride=2, dilation=2, groups=2, padding=1), (9,)),
    (lambda: nn.Conv1d(2, 3, 4, padding="same"), (7,)),
    (lambda: nn.Conv2d(4, 4, (2, 3), stride=(2, 1), dilation=(1, 2), groups=4, padding=(1, 0)),
     (5, 6)),
    (lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=1, bias=False), (3, 4, 3)),
    (lambda: nn.ConvTranspose2d(2, 3, 3, stride=2), (3, 3)),
])
def test_convolutions_of_every_kind(conv, shape):
    torch.manual_seed(0)
    layer = conv()
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)).double()
    x = torch.randn(5, layer.in_channels, *shape, dtype=torch.float64)
    model(x)  # materialise the lazy head
    engine = _engine(model, x)
    expected = "local" if isinstance(layer, nn.ConvTranspose2d) else "conv"
    assert engine.foreign == {} and engine.layers[0].rule.name == expected
    _check(model, x, torch.randn(3, layer.in_channels, *shape, dtype=torch.float64))


def test_layernorm_and_embedding_rules():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(7, 4, padding_idx=0)
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 2)

        def forward(self, t):
            return self.head(self.norm(self.embed(t)).mean(1))

    model = Tokens().double()
    x = torch.randint(0, 7, (6, 5))
    engine = _engine(model, x)
    assert [l.rule.name for l in engine.layers] == ["embedding", "layernorm", "linear"]
    _check(model, x, torch.randint(0, 7, (3, 5)))


class TwoLookups(nn.Module):
    """One Embedding read twice (tokens and a second token stream), a padding row, 2-d tokens."""

    def __init__(self, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, 5, padding_idx=3)
        self.head = nn.Linear(5, 3)

    def forward(self, t):
        e = self.embed(t) + 0.5 * self.embed(t.flip(-1)).tanh()
        return self.head(torch.tanh(e).mean(dim=(1, 2)))


@pytest.mark.parametrize("vocab,tokens", [(400, 8), (6, 6)], ids=["sparse", "scatter"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_embedding_token_pairs_and_scatter_agree_with_reference(vocab, tokens, dtype):
    """A large vocabulary with few distinct tokens: the share comes from matching pairs of
    positions (token entries); a small one: from scatter-added per-sample gradients."""
    torch.manual_seed(0)
    model = TwoLookups(vocab).to(dtype)
    x1, x2 = torch.randint(0, tokens, (13, 2, 4)), torch.randint(0, tokens, (5, 2, 4))
    x1[0, 0, :] = 3                       # padding positions
    engine = _engine(model, x1)
    layer = next(l for l in engine.layers if l.rule.name == "embedding")
    assert layer.rule.uses_tokens(layer) == (vocab == 400)
    ref_model = TwoLookups(vocab).double()
    ref_model.load_state_dict(model.state_dict())
    for mode in ("full", "trace", "diagonal"):
        for other in (None, x2):
            ref = torch_ntk.empirical_ntk(ref_model, x1, other, mode=mode, method="jacobian")
            got = torch_ntk.empirical_ntk(model, x1, other, mode=mode, method="structured",
                                          batch_size=4)
            assert_close(got, ref.to(dtype), dtype, f"{mode}, x2={other is not None}")
            if other is None:
                assert torch.equal(got, got.transpose(0, 1) if mode != "full"
                                   else got.permute(1, 0, 3, 2)), "not exactly symmetric"


def test_token_pairs_in_small_chunks(monkeypatch):
    """Matching pairs gathered a few at a time (one token matching more pairs than a chunk)."""
    from torch_ntk.empirical import factors
    monkeypatch.setattr(factors, "_PAIR_ELEMENTS", 7)
    torch.manual_seed(1)
    model = TwoLookups(3000).double()
    x = torch.randint(0, 3, (9, 2, 3))
    x[:, 0, 0] = 1                        # a token every sample holds
    layer = next(l for l in _engine(model, x).layers if l.rule.name == "embedding")
    assert layer.rule.uses_tokens(layer)
    _check(model, x, torch.randint(0, 5, (4, 2, 3)), batch_size=5)
    _check(model, x)


class TwoTiedTables(nn.Module):
    """Two Embeddings whose tables are also output heads; a Linear between them is innocent."""

    def __init__(self):
        super().__init__()
        self.e1, self.e2 = nn.Embedding(7, 4), nn.Embedding(7, 4)
        self.mid = nn.Linear(4, 4)

    def forward(self, t):
        h = torch.tanh(self.mid(self.e1(t[:, 0]) + self.e2(t[:, 1])))
        return nn.functional.linear(h, self.e1.weight) + nn.functional.linear(h, self.e2.weight)


def test_isolate_finds_every_wrong_layer_or_leaves_them_all():
    torch.manual_seed(0)
    model = TwoTiedTables().double()
    x = torch.randint(0, 7, (5, 2))
    params = dict(model.named_parameters())
    engine = StructuredNTK(model, params)
    engine.plan(x)
    r = verify.direction(model, params)
    names = [l.name for l in engine.layers]
    assert names == ["e1", "e2", "mid"] and verify.check(engine, x[:3], r).kind == "mismatch"
    assert engine.isolate(x[:3], r, max_checks=1) is None
    assert [l.name for l in engine.layers] == names and engine.foreign == {}
    assert sorted(engine.isolate(x[:3], r)) == ["e1", "e2"]
    assert [l.name for l in engine.layers] == ["mid"]
    assert set(engine.foreign) == {"e1.weight", "e2.weight"}
    assert verify.check(engine, x[:3], r).ok
    ref = torch_ntk.empirical_ntk(model, x, method="jacobian")
    assert_close(torch_ntk.empirical_ntk(model, x), ref, torch.float64, "auto after isolation")


@pytest.mark.parametrize("norm", [lambda: nn.BatchNorm2d(4), lambda: nn.GroupNorm(2, 4),
                                  lambda: nn.BatchNorm1d(4)])
def test_channel_norm_rule(norm):
    torch.manual_seed(0)
    layer = norm()
    conv = nn.Conv2d(2, 4, 2) if isinstance(layer, (nn.BatchNorm2d, nn.GroupNorm)) else \
        nn.Conv1d(2, 4, 2)
    model = nn.Sequential(conv, layer, nn.Tanh(), nn.Flatten(), nn.LazyLinear(2)).double()
    shape = (4, 4) if conv.__class__ is nn.Conv2d else (5,)
    x = torch.randn(5, 2, *shape, dtype=torch.float64)
    model.train()(x)                     # running statistics away from their defaults
    model.eval()
    engine = _engine(model, x)
    assert [l.rule.name for l in engine.layers][:2] == ["conv", "channelnorm"]
    _check(model, x, torch.randn(3, 2, *shape, dtype=torch.float64))


def test_conv_pairs_of_positions_when_cheaper():
    """Few output positions and wide layers: the conv share is a sum of Grams over position
    pairs; many positions: per-sample gradients. Both exact, with x2 None and distinct."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),      # 4x4 = 16 positions
                          nn.Conv2d(3, 64, 3, stride=2), nn.Tanh(),      # 1 position
                          nn.Conv2d(64, 64, 1), nn.Flatten(), nn.Linear(64, 5)).double()
    x = torch.randn(6, 2, 4, 4, dtype=torch.float64)
    engine = _engine(model, x)
    assert [(l.name, l.gram) for l in engine.layers] == [
        ("0", False), ("2", True), ("4", True), ("6", True)]
    _check(model, x, torch.randn(4, 2, 4, 4, dtype=torch.float64), batch_size=4)
    wide = nn.Sequential(nn.Conv2d(8, 64, 2), nn.Tanh(), nn.Flatten(), nn.Linear(64 * 4, 2))
    wide = wide.double()
    x = torch.randn(5, 8, 3, 3, dtype=torch.float64)   # 2x2 positions, K = 2: 4² (32 + 4·64)
    engine = _engine(wide, x)                           # < 4 · 32 · 64 multiply-adds per pair
    assert engine.layers[0].gram and engine.layers[0].state["positions"] == 4
    _check(wide, x, torch.randn(3, 8, 3, 3, dtype=torch.float64))


def test_ntk_linear_over_a_sequence_keeps_its_scales():
    model = nn.Sequential(torch_ntk.NTKLinear(3, 5, weight_scale=0.6, bias_scale=0.4), nn.Tanh(),
                          torch_ntk.NTKLinear(5, 2, weight_scale=0.3, bias_scale=2.0)).double()
    x = torch.randn(5, 4, 3, dtype=torch.float64)                 # (N, T, d): per-sample path
    engine = _engine(model, x)
    assert [(l.rule.name, l.gram) for l in engine.layers] == [("linear", False)] * 2
    _check(model, x, torch.randn(3, 4, 3, dtype=torch.float64))
