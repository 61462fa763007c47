"""``params=``: the kernel over a chosen subset of the parameters, the rest held constant."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_ntk
from conftest import assert_close, autograd_ntk

F64 = torch.float64


class Adapted(nn.Module):
    """A frozen-looking body with a low-rank adapter beside one layer, and attention."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.body = nn.Linear(8, 8)
        self.lora_a, self.lora_b = nn.Linear(8, 2, bias=False), nn.Linear(2, 8, bias=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = torch.tanh(self.body(h) + self.lora_b(self.lora_a(h)))
        return self.head(h.mean(1))


def _reference(model, names, x1, x2):
    """Per-sample autograd over the named parameters only."""
    return autograd_ntk(model, x1, x2, names)


SUBSETS = {
    "lora": (["lora_a.weight", "lora_b.weight"], lambda n, p: n.startswith("lora_")),
    "attention": ([n for n in ("attn.in_proj_weight", "attn.in_proj_bias",
                               "attn.out_proj.weight", "attn.out_proj.bias")],
                  lambda n, p: n.startswith("attn.")),
    "head_weight": (["head.weight"], lambda n, p: n == "head.weight"),
}


@pytest.mark.parametrize("subset", sorted(SUBSETS))
@pytest.mark.parametrize("method", ["auto", "structured", "jacobian"])
@pytest.mark.parametrize("distinct", [False, True], ids=["x2_none", "x2"])
def test_kernel_over_a_subset_by_names_or_callable(subset, method, distinct):
    torch.manual_seed(0)
    model = Adapted().double()
    x1 = torch.randn(5, 3, 5, dtype=F64)
    x2 = torch.randn(3, 3, 5, dtype=F64) if distinct else None
    names, pick = SUBSETS[subset]
    ref = _reference(model, names, x1, x1 if x2 is None else x2)
    flags = [p.requires_grad for p in model.parameters()]
    for select in (names, pick):
        for mode in ("full", "trace", "diagonal"):
            got = torch_ntk.empirical_ntk(model, x1, x2, mode=mode, method=method,
                                          params=select, batch_size=2)
            want = {"full": ref, "trace": ref.diagonal(dim1=2, dim2=3).sum(-1),
                    "diagonal": ref.diagonal(dim1=2, dim2=3)}[mode]
            assert_close(got, want, F64, f"{subset} {method} {mode}")
    assert [p.requires_grad for p in model.parameters()] == flags


def test_subset_of_a_float32_model():
    torch.manual_seed(1)
    model = Adapted()
    x = torch.randn(4, 3, 5)
    names = SUBSETS["lora"][0]
    ref = _reference(model.double(), names, x.double(), x.double())
    got = torch_ntk.empirical_ntk(model.float(), x, params=names)
    assert_close(got.double(), ref, torch.float32, "float32 lora")


def test_bad_selections_are_named():
    model = Adapted().double()
    x = torch.randn(3, 3, 5, dtype=F64)
    with pytest.raises(ValueError, match=r"lora_c.*doesn't have"):
        torch_ntk.empirical_ntk(model, x, params=["lora_c.weight"])
    with pytest.raises(ValueError, match="selects none"):
        torch_ntk.empirical_ntk(model, x, params=lambda n, p: False)
    with pytest.raises(TypeError, match="iterable of parameter names"):
        torch_ntk.empirical_ntk(model, x, params="head.weight")
    model.head.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad=False"):
        torch_ntk.empirical_ntk(model, x, params=["head.weight"])
    with pytest.raises(ValueError, match=r"selects parameter\(s\) \['head.weight'\] with "
                                         r"requires_grad=False"):
        torch_ntk.empirical_ntk(model, x, params=lambda n, p: n.startswith("head"))


def test_a_tied_parameter_answers_to_each_of_its_names():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.mid = nn.Embedding(9, 4), nn.Linear(4, 4)
            self.head = nn.Linear(4, 9, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, t):
            return self.head(torch.tanh(self.mid(self.embed(t).mean(1))))

    torch.manual_seed(0)
    model = Tied().double()
    x1, x2 = torch.randint(0, 9, (4, 3)), torch.randint(0, 9, (3, 3))
    ref = _reference(model, ["embed.weight"], x1, x2)
    for select in (["head.weight"], ["embed.weight", "head.weight"],
                   lambda n, p: n == "head.weight"):
        for method in ("auto", "jacobian"):
            got = torch_ntk.empirical_ntk(model, x1, x2, method=method, params=select)
            assert_close(got, ref, F64, f"{select} {method}")
        got = torch_ntk.empirical_ntk(model, x1, x2, method="structured", params=select)
        assert_close(got, ref, F64, f"{select} structured (a tied head joins the table)")
