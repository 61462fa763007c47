"""ntk_features: the sketch computed from factors equals the count sketch of the per-sample
Jacobian (explicitly formed here), on every kind of layer; unbiased, with error ~ dim^-1/2."""
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

import torch_ntk
from torch_ntk.implicit.sketch import Hashes


def explicit_sketch(model, x, dim, seed=0, names=None, prefix=""):
    """The count sketch of the torch.func per-sample Jacobian, Tensor[N, K, dim]; x a tensor
    or a tuple of batch tensors (``model(*x)``); hashes by parameter name less ``prefix``."""
    params = {k: v.detach() for k, v in model.named_parameters()
              if v.requires_grad and (names is None or k in names)}
    frozen = {k: v.detach() for k, v in model.named_parameters() if k not in params}
    xs = x if isinstance(x, tuple) else (x,)

    def f(p, *xi):
        return functional_call(model, {**p, **frozen}, tuple(t[None] for t in xi)).reshape(-1)

    jac = vmap(jacrev(f), in_dims=(None,) + (0,) * len(xs))(params, *xs)
    n, k = xs[0].shape[0], next(iter(jac.values())).shape[1]
    hashes = Hashes({name[len(prefix):]: p.shape for name, p in params.items()}, dim, seed,
                    xs[0].device)
    out = torch.zeros(n, k, dim, dtype=next(iter(params.values())).dtype)
    for name, p in params.items():
        buckets, signs = hashes.flat(name[len(prefix):], 0, p.numel())
        out.index_add_(2, buckets, jac[name].reshape(n, k, -1) * signs.to(out.dtype))
    return out


class TokenModel(nn.Module):
    """Embedding (with padding), a Linear over positions, LayerNorm, a head: every path."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6, padding_idx=0)
        self.mix = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.emb(tokens)))
        return self.head(self.norm(h).mean(1))


def conv_model():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 2, stride=2),
                         nn.Tanh(), nn.Flatten(), nn.Linear(16, 2))


CASES = {
    "mlp": (lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)),
            lambda g: torch.randn(7, 5, generator=g)),
    "mlp_k1": (lambda: nn.Sequential(nn.Linear(4, 9), nn.GELU(), nn.Linear(9, 1)),
               lambda g: torch.randn(5, 4, generator=g)),
    "conv": (conv_model, lambda g: torch.randn(5, 2, 4, 4, generator=g)),
    "tokens": (TokenModel, lambda g: torch.randint(0, 11, (6, 5), generator=g)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dim", [1, 37, 256])
def test_equals_sketch_of_jacobian(case, dim, dtype):
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    make_model, make_x = CASES[case]
    model = make_model().to(dtype)
    x = make_x(g)
    x = x.to(dtype) if x.is_floating_point() else x
    phi = torch_ntk.ntk_features(model, x, dim, seed=3)
    ref = explicit_sketch(model, x, dim, seed=3)
    assert phi.shape == ref.shape and phi.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert (phi - ref).abs().max() <= tol * max(1.0, float(ref.abs().max()))


def test_every_engine_path_gives_the_same_features(monkeypatch):
    """A conv layer sketched from position pairs, from per-sample gradients or through the
    Jacobian method gives the same features: the hashes live in parameter space."""
    from torch_ntk.empirical import api
    from torch_ntk.empirical.rules.conv import ConvRule

    torch.manual_seed(0)
    model = conv_model().double()
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    ref = explicit_sketch(model, x, 64)
    got = [torch_ntk.ntk_features(model, x, 64)]
    monkeypatch.setattr(ConvRule, "uses_gram", lambda self, layer: False)
    got.append(torch_ntk.ntk_features(model, x, 64))
    monkeypatch.setattr(api, "_STRUCTURED_SHARE", 0.0)   # the cost model takes the Jacobian
    got.append(torch_ntk.ntk_features(model, x, 64))
    for phi in got:
        assert torch.allclose(phi, ref, rtol=0, atol=1e-12)


def test_batches_share_one_space():
    torch.manual_seed(0)
    model = TokenModel().double()
    x = torch.randint(0, 11, (9, 5))
    whole = torch_ntk.ntk_features(model, x, 50, seed=7)
    parts = torch.cat([torch_ntk.ntk_features(model, x[:4], 50, seed=7),
                       torch_ntk.ntk_features(model, x[4:], 50, seed=7)])
    tiled = torch_ntk.ntk_features(model, x, 50, seed=7, batch_size=2)
    assert torch.allclose(whole, parts, rtol=0, atol=1e-13)
    assert torch.allclose(whole, tiled, rtol=0, atol=1e-13)
    other = torch_ntk.ntk_features(model, x, 50, seed=8)
    assert not torch.allclose(whole, other)


def test_params_output_and_dict_inputs():
    torch.manual_seed(0)
    model = TokenModel().double()
    x = torch.randint(0, 11, (6, 5))
    names = ["head.weight", "mix.weight", "emb.weight"]
    phi = torch_ntk.ntk_features(model, x, 40, params=names)
    assert torch.allclose(phi, explicit_sketch(model, x, 40, names=names), rtol=0, atol=1e-13)

    class Keyword(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, scale=1.0):
            return {"logits": self.inner(input_ids) * scale}

    wrapped = Keyword(model)
    got = torch_ntk.ntk_features(wrapped, {"input_ids": x, "scale": 2.0}, 40,
                                 output=lambda o: o["logits"][:, :2])
    direct = explicit_sketch(_Scaled(model, 2.0, 2), x, 40)
    # the wrapper's parameters are named "inner.*": the same hashes as _Scaled's "inner.*"
    assert torch.allclose(got, direct, rtol=0, atol=1e-13)


class _Scaled(nn.Module):
    def __init__(self, inner, scale, keep):
        super().__init__()
        self.inner, self.scale, self.keep = inner, scale, keep

    def forward(self, x):
        return (self.inner(x) * self.scale)[:, :self.keep]


def test_unbiased_with_error_falling_as_inverse_sqrt_dim():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                          nn.Linear(16, 2)).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    exact = torch_ntk.empirical_ntk(model, x)

    def estimate(phi):
        return torch.einsum("nad,mbd->nmab", phi, phi)

    errors = []
    for dim in (16, 64, 256):
        runs = [estimate(torch_ntk.ntk_features(model, x, dim, seed=s)) for s in range(16)]
        errors.append(sum(float((r - exact).norm() / exact.norm()) for r in runs) / len(runs))
    slope = math.log(errors[-1] / errors[0]) / math.log(256 / 16)
    assert -0.65 < slope < -0.35, errors
    many = torch.stack([estimate(torch_ntk.ntk_features(model, x, 64, seed=s))
                        for s in range(144)]).mean(0)
    # the mean of 144 draws: its error is that of one draw over sqrt(144), not a bias
    assert float((many - exact).norm() / exact.norm()) < 2 * errors[1] / 12


def test_bad_arguments():
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    for dim in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="dim must be a positive int"):
            torch_ntk.ntk_features(model, x, dim)
    with pytest.raises(TypeError, match="seed must be an int"):
        torch_ntk.ntk_features(model, x, 8, seed="a")
    with pytest.raises(ValueError, match="shape"):
        torch_ntk.ntk_features(model, x, 8, out=torch.empty(4, 2, 9))


def test_out_and_state_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 3)
    out = torch.full((5, 2, 16), float("nan"))
    got = torch_ntk.ntk_features(model, x, 16, out=out)
    assert got is out and torch.isfinite(out).all()
    assert model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_gate_on_one_sample_is_exact():
    """A model whose path changes for one rare sample still gets that sample's own sketch."""
    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.a(x)
            rare = (x[:, :1] > 2.5).to(x.dtype)
            return self.b(torch.tanh(h)) + rare * (h[:, :2] @ self.b.weight[:, :2].T)

    torch.manual_seed(0)
    model = Gate().double()
    x = torch.randn(12, 3, dtype=torch.float64)
    x[9, 0] = 3.0
    phi = torch_ntk.ntk_features(model, x, 32)
    assert torch.allclose(phi, explicit_sketch(model, x, 32), rtol=0, atol=1e-12)


class _Keyword(nn.Module):
    """A Hugging Face model called with a tuple, for the reference."""

    def __init__(self, model, output):
        super().__init__()
        self.model, self.output = model, output

    def forward(self, ids, mask):
        return self.output(self.model(input_ids=ids, attention_mask=mask))


def tiny_gpt2(n: int):
    """A 2-layer GPT-2 from a config (float64, eager attention) and n prompts of 7 tokens, one
    of them padded: (model, ids, mask)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=12, bos_token_id=0,
        eos_token_id=0, attn_implementation="eager")).double().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (n, 7), generator=g)
    mask = torch.ones(n, 7, dtype=torch.long)
    mask[1, 4:] = 0
    return model, ids, mask


def test_hugging_face_gpt2_with_tied_embeddings():
    model, ids, mask = tiny_gpt2(5)

    def output(o):
        return o.logits[:, -1, :4]

    phi = torch_ntk.ntk_features(model, {"input_ids": ids, "attention_mask": mask}, 96,
                                 output=output)
    ref = explicit_sketch(_Keyword(model, output), (ids, mask), 96, prefix="model.")
    assert (phi - ref).abs().max() <= 1e-12 * float(ref.abs().max())


@pytest.mark.parametrize("name,size", [("convnext_atto", 32), ("vit_tiny_patch16_224", 32)])
def test_timm_models(name, size):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    extra = {"img_size": size} if "patch16" in name else {}
    model = timm.create_model(name, pretrained=False, num_classes=3, **extra).double().eval()
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    phi = torch_ntk.ntk_features(model, x, 64)
    ref = explicit_sketch(model, x, 64)
    assert (phi - ref).abs().max() <= 1e-12 * float(ref.abs().max())


def _hooked():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[0].register_forward_hook(lambda m, i, o: 3.0 * o)
    return model


HOSTILE = ["Flipped", "Bucketed", "SometimesShared", "TiedHead", "hook", "SequenceFirst",
           "Unused"]


def hostile_case(name: str):
    """(model, x) of the hostile models: a reordered batch, a weight used elsewhere for some
    samples, a table reused as the head, a rescaling hook, a Linear on (T, N, d) (sketched by
    position), unused and detached layers."""
    import test_hostile

    torch.manual_seed(0)
    if name == "hook":
        model = _hooked()
    elif name == "SequenceFirst":
        model = test_hostile.SequenceFirst(5)
    else:
        model = getattr(test_hostile, name)()
    if name == "TiedHead":
        return model.double(), torch.randint(0, 9, (7, 3))
    x = torch.randn(7, 15 if name == "SequenceFirst" else 3, dtype=torch.float64)
    x[0, 0], x[-1, 0] = -1.0, 1.0
    return model.double(), x


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_models(name):
    """Models the structured method can't take as they come: their features are still the
    sketch of their own gradients."""
    model, x = hostile_case(name)
    phi = torch_ntk.ntk_features(model, x, 48)
    ref = explicit_sketch(model, x, 48)
    assert (phi - ref).abs().max() <= 1e-12 * float(ref.abs().max())
