"""Hostile models and arguments: an exact result or a clear ValueError/TypeError, never a wrong
number, an internal error or a damaged model."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import torch_ntk
from conftest import assert_close, autograd_ntk

F64 = torch.float64


def _exact(model, x1, x2=None, methods=("auto", "structured"), modes=("full",), **kw):
    for mode in modes:
        ref = torch_ntk.empirical_ntk(model, x1, x2, mode=mode, method="jacobian")
        for method in methods:
            got = torch_ntk.empirical_ntk(model, x1, x2, mode=mode, method=method, **kw)
            assert_close(got, ref, F64, f"{method} {mode}")


class Flipped(nn.Module):
    """Reverses the batch around its first layer: row n of that layer belongs to sample N-1-n."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.flip(0))).flip(0))


class Bucketed(nn.Module):
    """Sorts samples by their first feature, applies a layer, and unsorts."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        order = x[:, 0].argsort()
        h = torch.tanh(self.a(x[order]))
        return self.b(h[order.argsort()])


@pytest.mark.parametrize("cls", [Flipped, Bucketed])
def test_batch_reordered_around_a_layer(cls):
    model = cls().double()
    x1, x2 = torch.randn(6, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    _exact(model, x1, x2, methods=("auto",))
    with pytest.raises(ValueError, match=r"can't use layer\(s\) a: .*batch row"):
        torch_ntk.empirical_ntk(model, x1, x2, method="structured")


class SometimesShared(nn.Module):
    """The head's weight also enters through F.linear, for samples with x[0] > 0 only."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        extra = nn.functional.linear(h * h, self.head.weight) * (x[:, :1] > 0)
        return self.head(h) + extra


def test_weight_used_elsewhere_for_some_samples_only():
    model = SometimesShared().double()
    x1 = torch.randn(6, 3, dtype=F64)
    x1[0, 0] = -1.0                       # the first sample is not affected
    x1[-1, 0] = 1.0
    _exact(model, x1, methods=("auto",))
    with pytest.raises(ValueError, match="does not reproduce the model's own gradients"):
        torch_ntk.empirical_ntk(model, x1, method="structured")


class TiedHead(nn.Module):
    """An MLP body between an Embedding and an output head that reuses the table (F.linear)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(9, 6)
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                                  nn.Linear(16, 6))

    def forward(self, t):
        h = self.body(self.embed(t).mean(1))
        return nn.functional.linear(h, self.embed.weight)


def test_layer_whose_weight_acts_elsewhere_goes_alone_to_the_jacobian():
    torch.manual_seed(0)
    model = TiedHead().double()
    x1, x2 = torch.randint(0, 9, (7, 3)), torch.randint(0, 9, (4, 3))
    _exact(model, x1, x2, methods=("auto",), modes=("full", "trace", "diagonal"))
    _exact(model, x1, methods=("auto",), modes=("full", "diagonal"))
    with torch_ntk.empirical.api.KernelPlan(model, x1, x2) as plan:
        plan.compute_tile(0, 0)           # the first block's check isolates the table
        assert plan.engine.name == "structured"
        assert [l.name for l in plan.engine.layers] == ["body.0", "body.2", "body.4"]
        assert set(plan.engine.foreign) == {"embed.weight"}
    with pytest.raises(ValueError, match="does not reproduce the model's own gradients"):
        torch_ntk.empirical_ntk(model, x1, method="structured")


class Centered(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)

    def forward(self, x):
        h = self.a(x)
        return h - h.mean(0)


@pytest.mark.parametrize("method", ["auto", "structured", "jacobian"])
def test_interaction_is_caught_with_one_row(method):
    model = Centered().double()
    x = torch.randn(1, 3, dtype=F64)
    with pytest.raises(ValueError, match="depends on the other samples"):
        torch_ntk.empirical_ntk(model, x, method=method)
    with pytest.raises(ValueError, match="depends on the other samples"):
        torch_ntk.empirical_ntk(model, x.expand(4, 3).clone(), method=method)


def test_random_forward_is_named_as_such():
    class Noisy(nn.Linear):
        def forward(self, x):
            return super().forward(x) + torch.randn(x.shape[0], self.out_features,
                                                    dtype=x.dtype)

    with pytest.raises(ValueError, match="model is random"):
        torch_ntk.empirical_ntk(Noisy(3, 2).double(), torch.randn(5, 3, dtype=F64))


def test_noise_shared_by_the_batch_is_named_random():
    class SharedNoise(nn.Linear):
        def forward(self, x):
            return super().forward(x) + torch.randn((), dtype=x.dtype)

    with pytest.raises(ValueError, match="model is random"):
        torch_ntk.empirical_ntk(SharedNoise(3, 2).double(), torch.randn(5, 3, dtype=F64))


@pytest.mark.parametrize("method", ["auto", "jacobian", "structured"])
def test_a_row_dependent_output_is_named_an_interaction(method):
    class ByRow(nn.Linear):    # the same sample gives other outputs in other rows
        def forward(self, x):
            rows = torch.arange(x.shape[0], dtype=x.dtype)[:, None]
            return super().forward(x) + rows

    with pytest.raises(ValueError, match="depends on the other samples"):
        torch_ntk.empirical_ntk(ByRow(3, 2).double(), torch.randn(5, 3, dtype=F64),
                                method=method)


def test_out_behaves_like_an_in_place_output():
    model = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=F64)
    out = torch.zeros(4, 4, dtype=F64)
    w = torch.ones(4, 4, dtype=F64, requires_grad=True)
    loss = (w * out).sum()                # saves out for the backward
    torch_ntk.empirical_ntk(model, x, mode="trace", out=out)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with pytest.raises(ValueError, match="out requires grad"):
        torch_ntk.empirical_ntk(model, x, mode="trace",
                                out=torch.zeros(4, 4, dtype=F64, requires_grad=True))
    with pytest.raises(ValueError, match="overlapping memory"):
        torch_ntk.empirical_ntk(model, x, mode="trace", out=torch.zeros(4, 1, dtype=F64)
                                .expand(4, 4))
    big = torch.zeros(4, 4, dtype=F64)
    with pytest.raises(ValueError, match="shares memory with x1"):
        torch_ntk.empirical_ntk(nn.Linear(4, 1).double(), big, mode="trace", out=big)


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("n", torch.zeros(()))

    def forward(self, x):
        self.n = self.n + 1               # reassigns the buffer
        return self.lin(x)


def test_reassigned_buffer_is_restored():
    model = Counter().double()
    buffer = model.n
    torch_ntk.empirical_ntk(model, torch.randn(3, 3, dtype=F64))
    assert model.n is buffer and float(model.n) == 0.0


@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm", "orthogonal"])
def test_parametrized_layers_are_exact(wrap):
    torch.manual_seed(0)
    inner = nn.Linear(4, 4)
    inner = getattr(parametrizations, wrap)(inner)
    model = nn.Sequential(inner, nn.Tanh(), nn.Linear(4, 2)).double().eval()
    _exact(model, torch.randn(5, 4, dtype=F64), torch.randn(3, 4, dtype=F64))


class SequenceFirst(nn.Module):
    """A Linear applied to (T, N, d) with T equal to the probe sizes' first candidate."""

    def __init__(self, t):
        super().__init__()
        self.t = t
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):                  # x: (N, T * 3)
        h = self.a(x.reshape(x.shape[0], self.t, 3).transpose(0, 1))   # (T, N, 4)
        return self.b(torch.tanh(h).mean(0))


@pytest.mark.parametrize("t", [1, 5, 7])
def test_linear_over_any_axis_length(t):
    model = SequenceFirst(t).double()
    _exact(model, torch.randn(5, 3 * t, dtype=F64), torch.randn(2, 3 * t, dtype=F64))
    seq = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    _exact(seq, torch.randn(4, t, 3, dtype=F64))  # (N, T, d) batch-first, T = 1 too


class Unused(nn.Module):
    """A keyword call, a layer whose output never reaches f, and a detached branch."""

    def __init__(self):
        super().__init__()
        self.a, self.dead, self.cut, self.b = (nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3),
                                               nn.Linear(3, 2))

    def forward(self, x):
        h = torch.tanh(self.a(input=x))
        self.dead(h)
        return self.b(h) + self.cut(h).detach()[:, :2]


def test_keyword_calls_unused_and_detached_layers():
    _exact(Unused().double(), torch.randn(5, 3, dtype=F64), modes=("full", "trace"))


def test_constant_output_has_a_zero_kernel():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x).detach() * 0 + 1

    for method in ("auto", "structured", "jacobian"):
        k = torch_ntk.empirical_ntk(Constant().double(), torch.randn(3, 3, dtype=F64),
                                    method=method)
        assert k.shape == (3, 3, 2, 2) and not k.any()


def test_user_hook_that_rescales_a_layer_is_exact():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    handle = model[0].register_forward_hook(lambda m, i, o: 3.0 * o)
    try:
        _exact(model, torch.randn(5, 3, dtype=F64))
    finally:
        handle.remove()


def test_compiled_model_uses_its_original_module():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    compiled = torch.compile(model)
    x = torch.randn(4, 3, dtype=F64)
    ref = torch_ntk.empirical_ntk(model, x, method="jacobian")
    assert_close(torch_ntk.empirical_ntk(compiled, x), ref, F64, "compiled")


def test_autocast_is_off_inside_the_call():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(4, 3, dtype=F64)
    ref = torch_ntk.empirical_ntk(model, x, method="jacobian")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch_ntk.empirical_ntk(model, x)
    assert_close(got, ref, F64, "under autocast")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(5, 3)
    ref = torch_ntk.empirical_ntk(model.double(), x.double())
    got = torch_ntk.empirical_ntk(model.to(dtype), x.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), ref, rtol=5e-2, atol=5e-2 * float(ref.abs().max()))


def test_bad_inputs_are_named():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="x1 is complex"):
        torch_ntk.empirical_ntk(model, torch.randn(3, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="meta tensor"):
        torch_ntk.empirical_ntk(model, torch.empty(3, 3, device="meta"))
    with pytest.raises(ValueError, match="meta tensors"):
        torch_ntk.empirical_ntk(nn.Linear(3, 2, device="meta"), torch.empty(3, 3))
    import numpy as np
    k = torch_ntk.empirical_ntk(model.double(), torch.randn(5, 3, dtype=F64),
                                batch_size=np.int64(2))
    assert k.shape == (5, 5, 2, 2)


def test_batch_size_bounds_the_factor_cache(monkeypatch):
    from torch_ntk.empirical import api
    sizes = []
    real = api._FactorCache.__init__

    def spy(self, compute, x, blocks, budget, side):
        sizes.append(budget)
        real(self, compute, x, blocks, budget, side)

    monkeypatch.setattr(api._FactorCache, "__init__", spy)
    model = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 2)).double()
    torch_ntk.empirical_ntk(model, torch.randn(9, 3, dtype=F64), torch.randn(40, 3, dtype=F64),
                            batch_size=2)
    per_sample = (3 + 2 * 64 + 64 + 2 * 2) * 8
    assert sizes and sizes[-1] <= 4 * 2 * per_sample + 1


@pytest.mark.parametrize("mode", ["full", "trace"])
@pytest.mark.parametrize("free_gib", [64, 0])
def test_wide_factors_take_equal_blocks_where_memory_allows(monkeypatch, mode, free_gib):
    """Factors wider than the block budget: equal blocks of up to _WIDE_BLOCK samples while
    every block fits in memory, the plain budget otherwise; the kernel is the same."""
    from torch_ntk.empirical import api
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    per_sample = 2 * sum(p.numel() for p in model.parameters()) * 8
    monkeypatch.setattr(api, "_FACTOR_BYTES", 2 * per_sample)      # a block of 2 by budget
    monkeypatch.setattr(api, "_WIDE_BLOCK", 8)
    monkeypatch.setattr(api, "_free_bytes", lambda device: free_gib * 2 ** 30)
    sizes = []
    real = api._blocks
    monkeypatch.setattr(api, "_blocks", lambda n, size: sizes.append(size) or real(n, size))
    x = torch.randn(19, 3, dtype=F64)
    got = torch_ntk.empirical_ntk(model, x, mode=mode, method="jacobian")
    assert sizes[-1] == (7 if free_gib else 2)     # 19 samples: 7, 7, 5 (not 8, 8, 3)
    ref = autograd_ntk(model, x, x)
    assert_close(got, ref if mode == "full" else ref.diagonal(dim1=2, dim2=3).sum(-1), F64)


class WideForward(nn.Module):
    """Few parameters, a forward that holds 2,000 times its input per sample."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        spread = torch.tanh(self.inner(x)).repeat(1, 375)                 # (n, 6000)
        return self.head(spread.view(x.shape[0], 375, 16).mean(1))


def test_wide_blocks_leave_room_for_the_forward(monkeypatch):
    """Blocks grow only while each block's factors and its forward (once per output) fit."""
    from torch_ntk.empirical import api
    model = WideForward().double()
    per_sample = 2 * sum(p.numel() for p in model.parameters()) * 8
    monkeypatch.setattr(api, "_FACTOR_BYTES", 2 * per_sample)
    monkeypatch.setattr(api, "_WIDE_BLOCK", 8)
    sizes = []
    real = api._blocks
    monkeypatch.setattr(api, "_blocks", lambda n, size: sizes.append(size) or real(n, size))
    x = torch.randn(19, 3, dtype=F64)
    forward = 2 * 48000     # the repeated tensor alone, once per output
    for room, most in ((4, 4), (100, 7)):  # a quarter: 8+ samples' factors, `room` forwards
        monkeypatch.setattr(api, "_free_bytes",
                            lambda device: 4 * room * (per_sample + forward))
        got = torch_ntk.empirical_ntk(model, x, method="jacobian")
        assert 2 <= sizes[-1] <= most
        assert_close(got, autograd_ntk(model, x, x), F64)
    assert sizes[-1] == 7


def test_integer_inputs_to_a_float_model_are_named():
    with pytest.raises(TypeError, match="failed on x1 of dtype torch.int64.*x1.to"):
        torch_ntk.empirical_ntk(nn.Linear(3, 2), torch.randint(0, 5, (4, 3)))


class TiedLM(nn.Module):
    """An Embedding whose table is also the weight of the Linear head (a tied LM head)."""

    def __init__(self, padding_idx=None, bias=False, extra_use=False, every_position=False):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=padding_idx)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=bias)
        self.head.weight = self.emb.weight
        self.extra_use, self.every_position = extra_use, every_position

    def forward(self, ids):
        h = torch.tanh(self.mix(self.emb(ids)))
        logits = self.head(h)
        out = logits.flatten(1) if self.every_position else logits[:, -1, :4]
        if self.extra_use:   # the table read once more by F.linear, for one token only
            out = out + (h[:, 0] @ self.emb.weight[:out.shape[1]].T) * (ids[:, :1] == 3)
        return out


@pytest.mark.parametrize("kind", ["plain", "padding", "bias", "every_position"])
def test_a_tied_head_joins_the_table_sparsely(kind):
    from torch_ntk.empirical.api import KernelPlan
    torch.manual_seed(0)
    model = TiedLM(padding_idx=2 if kind == "padding" else None, bias=kind == "bias",
                   every_position=kind == "every_position").double()
    ids = torch.randint(0, 11, (6, 5), generator=torch.Generator().manual_seed(1))
    with KernelPlan(model, ids, method="structured") as plan:
        assert not plan.engine.foreign and "head" in plan.engine.layers[0].state
    for x2 in (None, ids[:4].flip(1)):
        ref = torch_ntk.empirical_ntk(model, ids, x2, method="jacobian")
        for mode in ("full", "trace", "diagonal"):
            got = torch_ntk.empirical_ntk(model, ids, x2, method="structured", mode=mode)
            want = {"full": ref, "trace": torch.einsum("nmaa->nm", ref),
                    "diagonal": torch.einsum("nmaa->nma", ref)}[mode]
            assert_close(got, want, F64, f"tied head, {kind}, {mode}")


def test_a_tied_table_read_once_more_on_one_sample_is_caught():
    torch.manual_seed(0)
    model = TiedLM(extra_use=True).double()
    ids = torch.randint(4, 11, (6, 5), generator=torch.Generator().manual_seed(1))
    ids[4, 0] = 3          # only sample 4 takes the extra read
    ref = torch_ntk.empirical_ntk(model, ids, method="jacobian")
    assert_close(torch_ntk.empirical_ntk(model, ids), ref, F64, "auto, tied table read again")
    with pytest.raises(ValueError, match="also acts outside"):
        torch_ntk.empirical_ntk(model, ids, method="structured")


class Positions(nn.Module):
    """Token and position embeddings, the positions looked up once for the whole batch."""

    def __init__(self, use="add"):
        super().__init__()
        self.tok, self.pos = nn.Embedding(9, 4), nn.Embedding(5, 4)
        self.out = nn.Linear(4 * 5, 3)
        self.use = use

    def forward(self, ids):
        pos = self.pos(torch.arange(ids.shape[1]).unsqueeze(0))       # (1, T, w)
        if self.use == "first":      # the batch's copy 0 only: δ would all go to sample 0
            pos = pos[0]
        elif self.use == "view":     # a view that only the unexpanded (1, T, w) allows
            pos = pos.view(ids.shape[1], 4)
        return self.out(torch.tanh(self.tok(ids) + pos).flatten(1))


@pytest.mark.parametrize("use", ["add", "first", "view"])
def test_a_table_looked_up_once_for_the_batch(use):
    from torch_ntk.empirical.api import KernelPlan
    torch.manual_seed(0)
    model = Positions(use).double()
    ids = torch.randint(0, 9, (6, 5), generator=torch.Generator().manual_seed(1))
    for x2 in (None, ids[:4].flip(1)):
        ref = torch_ntk.empirical_ntk(model, ids, x2, method="jacobian")
        assert_close(torch_ntk.empirical_ntk(model, ids, x2), ref, F64, f"auto, {use}")
    if use == "add":   # its share from the rule, per sample
        with KernelPlan(model, ids, method="structured") as plan:
            assert not plan.engine.foreign
        assert_close(torch_ntk.empirical_ntk(model, ids, method="structured"),
                     torch_ntk.empirical_ntk(model, ids, method="jacobian"), F64, "structured")
    else:
        with pytest.raises(ValueError, match="pos"):
            torch_ntk.empirical_ntk(model, ids, method="structured")
