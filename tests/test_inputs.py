"""empirical_ntk on models called as their users call them: tuple and dict inputs, ``output=``,
``mode="pntk"``, ``by_layer=True``, against the reference on a plain tensor-to-tensor wrapper;
Hugging Face and timm models when those libraries are installed."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import torch_ntk
from conftest import autograd_ntk

MODES = ("full", "trace", "diagonal")


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


class Masked(nn.Module):
    """Takes x, a mask and a constant; returns a dict with a batch-first tensor and a
    constant."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x, mask=None, scale=1.0):
        h = torch.tanh(self.a(x)) * scale
        if mask is not None:
            h = h * mask
        return {"logits": self.b(h), "hidden": h, "steps": 3}


class Packed(nn.Module):
    """The reference: the same model on one tensor [x, mask] with the constant fixed."""

    def __init__(self, model, scale, take="logits"):
        super().__init__()
        self.model, self.scale, self.take = model, scale, take

    def forward(self, xm):
        out = self.model(xm[:, :3], xm[:, 3:], self.scale)
        if self.take == "all":
            return torch.cat([out["logits"], out["hidden"]], 1)
        return out[self.take]


def _data(n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=dtype)
    mask = (torch.rand(n, 5, generator=g) > 0.3).to(dtype)
    return x, mask


def _reference(model, xm1, xm2, mode, scale, take="logits"):
    k = autograd_ntk(Packed(model, scale, take), xm1, xm1 if xm2 is None else xm2)
    return {"full": k, "trace": torch.einsum("nmaa->nm", k),
            "diagonal": torch.einsum("nmaa->nma", k), "pntk": k.sum((2, 3)) / k.shape[-1]}[mode]


@pytest.mark.parametrize("mode", MODES + ("pntk",))
@pytest.mark.parametrize("kind", ["dict", "tuple"])
@pytest.mark.parametrize("distinct", [False, True])
@pytest.mark.parametrize("method", ["auto", "jacobian", "structured"])
def test_dict_and_tuple_inputs_match_the_packed_reference(mode, kind, distinct, method):
    torch.manual_seed(0)
    model = Masked().double()
    x1, m1 = _data(7, 1)
    x2, m2 = _data(4, 2)

    def pack(x, m):
        return {"x": x, "mask": m, "scale": 1.5} if kind == "dict" else (x, m, 1.5)

    got = torch_ntk.empirical_ntk(model, pack(x1, m1), pack(x2, m2) if distinct else None,
                                  mode=mode, method=method, output=lambda o: o["logits"],
                                  batch_size=3)
    ref = _reference(model, torch.cat([x1, m1], 1),
                     torch.cat([x2, m2], 1) if distinct else None, mode, 1.5)
    assert got.shape == ref.shape and _rel(got, ref) < 1e-12


def test_all_tensors_of_a_dict_output_are_taken():
    model = Masked().double()
    x, m = _data(5, 3)
    got = torch_ntk.empirical_ntk(model, (x, m, 0.5), mode="trace")
    ref = _reference(model, torch.cat([x, m], 1), None, "trace", 0.5, take="all")
    assert _rel(got, ref) < 1e-12


def test_output_on_a_tensor_input_and_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(6, 4)
    got = torch_ntk.empirical_ntk(model, x, output=lambda f: f[:, 1:], mode="diagonal")
    ref = torch_ntk.empirical_ntk(model, x, mode="diagonal", method="jacobian")[..., 1:]
    assert got.dtype == torch.float32 and _rel(got, ref) < 1e-5
    pntk = torch_ntk.empirical_ntk(model.double(), x.double(), mode="pntk")
    full = torch_ntk.empirical_ntk(model.double(), x.double(), method="jacobian")
    assert _rel(pntk, full.sum((2, 3)) / 3) < 1e-12


def test_out_and_batch_size_with_dict_inputs():
    model = Masked().double()
    x, m = _data(9, 4)
    out = torch.full((9, 9), float("nan"), dtype=torch.float64)
    got = torch_ntk.empirical_ntk(model, {"x": x, "mask": m}, mode="trace",
                                  output=lambda o: o["logits"], out=out, batch_size=4)
    assert got is out
    ref = _reference(model, torch.cat([x, m], 1), None, "trace", 1.0)
    assert _rel(out, ref) < 1e-12


@pytest.mark.parametrize("mode", ["trace", "full", "pntk"])
def test_by_layer_sums_to_the_kernel(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.ReLU(),
                          nn.Linear(4, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    parts = torch_ntk.empirical_ntk(model, x, x[:4], mode=mode, by_layer=True)
    assert list(parts) == ["0", "2", "4"]
    total = torch_ntk.empirical_ntk(model, x, x[:4], mode=mode)
    assert _rel(sum(parts.values()), total) < 1e-12
    only = torch_ntk.empirical_ntk(model, x, x[:4], mode=mode, params=["2.weight", "2.bias"])
    assert _rel(parts["2"], only) < 1e-13


def test_by_layer_counts_a_tied_weight_once_and_names_the_root():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.emb.weight
            self.gain = nn.Parameter(torch.tensor(1.3))

        def forward(self, ids):
            return self.head(torch.tanh(self.emb(ids).mean(1)) * self.gain)

    torch.manual_seed(0)
    model = Tied().double()
    ids = torch.randint(0, 7, (5, 3))
    parts = torch_ntk.empirical_ntk(model, ids, mode="trace", by_layer=True)
    assert sorted(parts) == ["", "emb"]
    total = torch_ntk.empirical_ntk(model, ids, mode="trace")
    assert _rel(parts[""] + parts["emb"], total) < 1e-12
    outs = {"emb": torch.empty(5, 5, dtype=torch.float64)}
    again = torch_ntk.empirical_ntk(model, ids, mode="trace", by_layer=True, out=outs)
    assert again["emb"] is outs["emb"] and _rel(again["emb"], parts["emb"]) < 1e-15
    with pytest.raises(ValueError, match="dict of tensors keyed by module name"):
        torch_ntk.empirical_ntk(model, ids, mode="trace", by_layer=True,
                                out={"nope": torch.empty(5, 5)})


def test_params_by_name_with_dict_inputs_and_state_untouched():
    model = Masked().double()
    for p in model.b.parameters():
        p.grad = torch.ones_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, m = _data(5, 5)
    got = torch_ntk.empirical_ntk(model, {"x": x, "mask": m}, mode="trace",
                                  output=lambda o: o["logits"], params=["b.weight"])
    packed = Packed(model, 1.0)
    ref = torch_ntk.empirical_ntk(packed, torch.cat([x, m], 1), mode="trace",
                                  params=["model.b.weight"], method="jacobian")
    assert _rel(got, ref) < 1e-12
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.b.parameters())
    assert model.a.weight.grad is None and model.training


def test_bad_inputs_are_refused():
    model = Masked().double()
    x, m = _data(5, 6)
    call = torch_ntk.empirical_ntk
    with pytest.raises(ValueError, match="same keys"):
        call(model, {"x": x, "mask": m}, {"x": x}, output=lambda o: o["logits"])
    with pytest.raises(ValueError, match="same number of samples"):
        call(model, {"x": x, "mask": m[:3]}, output=lambda o: o["logits"])
    with pytest.raises(ValueError, match="passed to every call as they are"):
        call(model, (x, m, 1.0), (x, m, 2.0), output=lambda o: o["logits"])
    with pytest.raises(ValueError, match="must match after the batch dimension"):
        call(model, (x, m), (x, m[:, :4]), output=lambda o: o["logits"])
    with pytest.raises(TypeError, match="pass both the same way"):
        call(model, (x, m), x)
    with pytest.raises(TypeError, match="output must be a callable"):
        call(model, (x, m), output="logits")
    with pytest.raises(TypeError, match="must return a tensor"):
        call(model, (x, m), output=lambda o: o["steps"])
    with pytest.raises(ValueError, match="must keep the batch first"):
        call(model, (x, m), output=lambda o: o["logits"].mean(0, keepdim=True))
    with pytest.raises(ValueError, match="must keep the batch first"):
        call(model, (x, m), output=lambda o: o["logits"].sum())
    with pytest.raises(ValueError, match="NaN or infinite"):
        call(model, (x, m * float("nan")), output=lambda o: o["logits"])
    with pytest.raises(TypeError, match="with no tensor"):
        call(model, {"scale": 1.0}, output=lambda o: o["logits"])
    with pytest.raises(ValueError, match="mode must be one of"):
        call(model, (x, m), mode="pseudo")

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return {"y": self.fc(x), "first": self.fc(x)[:1]}

    with pytest.raises(ValueError, match="not all batch-first"):
        call(Odd().double(), (x,))


def test_distributed_takes_the_same_arguments(tmp_path):
    """One rank (gloo, world size 1): dict inputs, output and params reach the plan."""
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    model = Masked().double()
    x, m = _data(6, 7)
    fresh = not dist.is_initialized()
    if fresh:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0,
                                world_size=1)
    try:
        got = torch_ntk.distributed.empirical_ntk(model, {"x": x, "mask": m}, mode="pntk",
                                                  output=lambda o: o["logits"],
                                                  params=["a.weight", "b.weight"])
        with pytest.raises(ValueError, match="a callable can't|got a callable"):
            torch_ntk.distributed.empirical_ntk(model, {"x": x, "mask": m},
                                                output=lambda o: o["logits"],
                                                params=lambda n, p: True)
    finally:
        if fresh:
            dist.destroy_process_group()
    ref = torch_ntk.empirical_ntk(model, {"x": x, "mask": m}, mode="pntk",
                                  output=lambda o: o["logits"], params=["a.weight", "b.weight"])
    assert _rel(got, ref) < 1e-13


# Real models (random init from configs, no download)

def _hf_models():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=12, bos_token_id=0,
        eos_token_id=0))
    bert = transformers.BertModel(transformers.BertConfig(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32,
        vocab_size=40, max_position_embeddings=12))
    return {"gpt2": (gpt2, lambda o: o.logits[:, -1, :4]),
            "bert": (bert, lambda o: o.pooler_output[:, :5])}


@pytest.mark.parametrize("name", ["gpt2", "bert"])
@pytest.mark.parametrize("distinct", [False, True])
def test_hugging_face_models_with_padded_masks(name, distinct):
    model, output = _hf_models()[name]
    model = model.double().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (5, 7), generator=g)
    mask = torch.ones(5, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    x1 = {"input_ids": ids, "attention_mask": mask}
    x2 = {"input_ids": ids[:3].flip(1), "attention_mask": mask[:3]} if distinct else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch_ntk.empirical_ntk(model, x1, x2, output=output, method="jacobian")
        for mode in MODES + ("pntk",):
            got = torch_ntk.empirical_ntk(model, x1, x2, output=output, mode=mode)
            want = {"full": ref, "trace": torch.einsum("nmaa->nm", ref),
                    "diagonal": torch.einsum("nmaa->nma", ref),
                    "pntk": ref.sum((2, 3)) / ref.shape[-1]}[mode]
            assert _rel(got, want) < 1e-10, mode
        lora_like = torch_ntk.empirical_ntk(model, x1, x2, output=output, mode="trace",
                                            params=lambda n, p: "attn" in n or "attention" in n)
        assert lora_like.shape == want.shape[:2]


_TIMM_ZOO = {"convnext_atto": 32, "vit_tiny_patch16_224": 32, "deit_tiny_patch16_224": 32,
             "regnetx_002": 32, "mobilevit_xxs": 64}


@pytest.mark.parametrize("name", list(_TIMM_ZOO))
def test_timm_zoo_in_every_mode(name):
    timm = pytest.importorskip("timm")
    size = _TIMM_ZOO[name]
    extra = {"img_size": size} if "patch16" in name else {}
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3, **extra).double().eval()
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    ref = torch_ntk.empirical_ntk(model, x, x[:2], method="jacobian")
    for mode in MODES + ("pntk",):
        got = torch_ntk.empirical_ntk(model, x, x[:2] if mode != "trace" else None, mode=mode)
        full = ref if mode != "trace" else torch_ntk.empirical_ntk(model, x, method="jacobian")
        want = {"full": full, "trace": torch.einsum("nmaa->nm", full),
                "diagonal": torch.einsum("nmaa->nma", full),
                "pntk": full.sum((2, 3)) / full.shape[-1]}[mode]
        assert _rel(got, want) < 1e-10, mode


def _prompts(n, t, seed, padded, distinct):
    """x1 of n prompts of t tokens from a 40-token vocabulary, prompt padded[0] padded from
    position padded[1]; x2 three of them reversed, or None."""
    ids = torch.randint(0, 40, (n, t), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(n, t, dtype=torch.long)
    mask[padded[0], padded[1]:] = 0
    x1 = {"input_ids": ids, "attention_mask": mask}
    x2 = {"input_ids": ids[:3].flip(1), "attention_mask": mask[:3]} if distinct else None
    return x1, x2


def _every_mode_matches(model, x1, x2, tol=1e-10, **kwargs):
    """auto in every mode, x2 as given, against the Jacobian method's full kernel."""
    ref = torch_ntk.empirical_ntk(model, x1, x2, method="jacobian", **kwargs)
    for mode in MODES + ("pntk",):
        got = torch_ntk.empirical_ntk(model, x1, x2, mode=mode, **kwargs)
        want = {"full": ref, "trace": torch.einsum("nmaa->nm", ref),
                "diagonal": torch.einsum("nmaa->nma", ref),
                "pntk": ref.sum((2, 3)) / ref.shape[-1]}[mode]
        assert _rel(got, want) < tol, mode


@pytest.mark.parametrize("name,size", [("efficientnet_b0", 32),
                                       ("swin_tiny_patch4_window7_224", 56),
                                       ("resnet18", 32), ("mobilenetv3_small_050", 32)])
@pytest.mark.parametrize("distinct", [False, True])
def test_timm_models_in_every_mode(name, size, distinct):
    timm = pytest.importorskip("timm")
    extra = {"img_size": size} if "swin" in name else {}
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3, **extra).double().eval()
    x = torch.randn(3, 3, size, size, dtype=torch.float64)
    _every_mode_matches(model, x, x[:2].flip(0) if distinct else None)


def test_timm_layer_kernels_sum_to_the_kernel():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3).double().eval()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    ref = torch_ntk.empirical_ntk(model, x, x[:2], method="jacobian", mode="trace")
    parts = torch_ntk.empirical_ntk(model, x, x[:2], mode="trace", by_layer=True)
    assert _rel(sum(parts.values()), ref) < 1e-10


@pytest.mark.parametrize("distinct", [False, True])
def test_hugging_face_llama_in_every_mode(distinct):
    """A Llama-style model: RMSNorm computing in float32 inside the float64 model, rotary
    positions, gated MLP, padded prompts; the structured method too (its checks follow the
    precision the norms compute in)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=40, max_position_embeddings=16)
    model = transformers.LlamaForCausalLM(config).double().eval()
    x1, x2 = _prompts(4, 6, seed=3, padded=(1, 4), distinct=distinct)
    output = lambda o: o.logits[:, -1, :3]  # noqa: E731
    # The norms compute in float32: kernels of different functions of the same model (the
    # pseudo-NTK's Σ_a f_a) agree to float32 rounding only.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _every_mode_matches(model, x1, x2, tol=1e-6, output=output)
        ref = torch_ntk.empirical_ntk(model, x1, x2, output=output, mode="trace",
                                      method="jacobian")
        got = torch_ntk.empirical_ntk(model, x1, x2, output=output, mode="trace",
                                      method="structured")
    assert _rel(got, ref) < 1e-6


@pytest.mark.parametrize("distinct", [False, True])
def test_hugging_face_vit_in_every_mode(distinct):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=24, num_labels=3)
    model = transformers.ViTForImageClassification(config).double().eval()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    x1 = {"pixel_values": x}
    x2 = {"pixel_values": x[:3].flip(0)} if distinct else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _every_mode_matches(model, x1, x2, output=lambda o: o.logits)


def test_the_choice_of_auto_is_logged(caplog):
    import logging
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    with caplog.at_level(logging.INFO, logger="torch_ntk"):
        torch_ntk.empirical_ntk(model, torch.randn(5, 3), mode="trace")
        torch_ntk.empirical_ntk(model, torch.randn(5, 3), mode="trace", method="jacobian")
    lines = [r.getMessage() for r in caplog.records if r.name == "torch_ntk"]
    assert "method 'structured' (its contraction is the cheaper; 2 layers factorised)" in lines[0]
    assert "method 'jacobian' (asked for)" in lines[1] and "K=2 outputs, 50 parameters" in lines[1]


class WithAttention(nn.Module):
    """MultiheadAttention (the catch-all rule also takes its child out_proj's parameters), a
    conv and a root parameter."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 2)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 2)
        self.gain = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        h = self.conv(x).transpose(1, 2)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(torch.tanh(h.mean(1))) * self.gain


@pytest.mark.parametrize("name", ["mlp", "attention", "embedding"])
@pytest.mark.parametrize("mode", ["full", "trace"])
@pytest.mark.parametrize("distinct", [False, True])
def test_by_layer_in_one_pass_equals_one_call_per_module(name, mode, distinct):
    from torch_ntk.empirical import api
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
        x = torch.randn(7, 3, dtype=torch.float64)
    elif name == "attention":
        model = WithAttention().double()
        x = torch.randn(7, 3, 6, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Embedding(9, 4), nn.Flatten(), nn.Linear(12, 9)).double()
        model[2].weight = nn.Parameter(model[2].weight.detach().clone())
        x = torch.randint(0, 9, (7, 3))
    x2 = x[:4].flip(0) if distinct else None
    one = torch_ntk.empirical_ntk(model, x, x2, mode=mode, by_layer=True, batch_size=3)
    calls = api._by_layer_calls(model, x, x2, out=None, params=None, mode=mode,
                                method="auto", batch_size=3, output=None)
    assert list(one) == list(calls)
    for key in calls:
        assert _rel(one[key], calls[key]) < 1e-12, key


_TIMM_NORMS = {"convnext_atto": "LayerNorm2d", "regnetx_002": "BatchNormAct2d",
               "mobilenetv3_small_050": "BatchNormAct2d", "vit_tiny_patch16_224": "LayerNorm"}


@pytest.mark.parametrize("name", list(_TIMM_NORMS))
def test_timm_norms_are_factorised(name):
    """timm's LayerNorm, LayerNorm2d and BatchNormAct2d (its activation included) take their
    rules, not the catch-all; the structured kernel equals the Jacobian's."""
    timm = pytest.importorskip("timm")
    from torch_ntk.empirical.api import KernelPlan
    extra = {"img_size": 32} if "patch16" in name else {}
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3, **extra).double().eval()
    for module in model.modules():   # running statistics away from (0, 1)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with KernelPlan(model, x, method="structured") as plan:
        rules = {type(l.module).__name__: l.rule.name for l in plan.engine.layers}
    assert rules[_TIMM_NORMS[name]] != "local"
    for x2 in (None, x[:3]):
        ref = torch_ntk.empirical_ntk(model, x, x2, method="jacobian")
        got = torch_ntk.empirical_ntk(model, x, x2, method="structured")
        assert _rel(got, ref) < 1e-10


@pytest.mark.parametrize("distinct", [False, True])
def test_gpt2_conv1d_layers_are_linear_layers(distinct):
    """transformers' Conv1D (weight stored transposed) takes the linear rule; the structured
    kernel over its parameters equals the Jacobian's, the bias alone too."""
    from torch_ntk.empirical.api import KernelPlan
    model, output = _hf_models()["gpt2"]
    model = model.double().eval()
    x1, x2 = _prompts(5, 7, seed=2, padded=(2, 5), distinct=distinct)
    with KernelPlan(model, x1, output=output, method="structured") as plan:
        rules = {l.name: l.rule.name for l in plan.engine.layers}
    assert {r for n, r in rules.items() if n.endswith(("c_attn", "c_fc", "c_proj"))} == {"linear"}
    for params in (lambda n, p: "c_" in n, lambda n, p: "c_fc.bias" in n):
        ref = torch_ntk.empirical_ntk(model, x1, x2, output=output, params=params,
                                      method="jacobian")
        for mode in MODES:
            got = torch_ntk.empirical_ntk(model, x1, x2, output=output, params=params,
                                          method="structured", mode=mode)
            want = {"full": ref, "trace": torch.einsum("nmaa->nm", ref),
                    "diagonal": torch.einsum("nmaa->nma", ref)}[mode]
            assert _rel(got, want) < 1e-10, mode


def test_batchnorm_act_with_a_parametrised_activation():
    """timm's BatchNormAct2d whose activation has its own parameter (PReLU) and drops
    nothing: both shares exact under the structured method."""
    pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d
    torch.manual_seed(0)
    norm = BatchNormAct2d(4, act_layer=nn.PReLU).eval()
    norm.running_mean.uniform_(-1, 1)
    norm.running_var.uniform_(0.5, 2)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), norm, nn.Flatten(), nn.Linear(4 * 16, 3))
    model = model.double()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    ref = torch_ntk.empirical_ntk(model, x, method="jacobian")
    assert _rel(torch_ntk.empirical_ntk(model, x, method="structured"), ref) < 1e-10
    assert isinstance(norm.act, nn.PReLU)
