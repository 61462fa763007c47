"""analytic_ntk(model, x): infinite-width kernels of modules built from NTK layers.

References: neural-tangents 0.6.5 stax (values stored in tests/data/nt_architectures.npz by
benchmarks/nt_architectures.py), the depth= form for MLPs, the empirical NTK of wide networks,
and the pure-torch rules for the native core.
"""
from __future__ import annotations

import contextlib
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_ntk
from torch_ntk.infinite import program
from torch_ntk.native import pairs, route

DATA = os.path.join(os.path.dirname(__file__), "data", "nt_architectures.npz")
NATIVE = torch_ntk.native.info()["cpu"]


class Residual(nn.Module):
    """x + block(x)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x):
        return x + self.block(x)


def build(layers, input_shape, eps=1e-12) -> nn.Module:
    """A torch module from the layer lists of benchmarks/nt_architectures.py."""
    modules = []
    shape = list(input_shape)
    for layer in layers:
        kind = layer[0]
        if kind == "conv":
            _, out, k, s, pad, w, b = layer
            cls = torch_ntk.NTKConv1d if len(shape) == 2 else torch_ntk.NTKConv2d
            conv = cls(shape[0], out, k, s, padding=pad, w_std=w, b_std=b)
            modules.append(conv)
            shape = [out, *conv.output_size(tuple(shape[1:]))]
        elif kind == "dense":
            _, out, w, b = layer
            modules.append(torch_ntk.NTKLinear(math.prod(shape), out, w_std=w, b_std=b))
            shape = [out]
        elif kind in ("relu", "erf", "gelu", "identity", "tanh"):
            modules.append({"relu": nn.ReLU(), "erf": torch_ntk.Erf(), "gelu": nn.GELU(),
                            "identity": nn.Identity(), "tanh": nn.Tanh()}[kind])
        elif kind == "leaky_relu":
            modules.append(nn.LeakyReLU(layer[1]))
        elif kind == "avgpool":
            _, k, s = layer
            cls = nn.AvgPool1d if len(shape) == 2 else nn.AvgPool2d
            modules.append(cls(k, s))
            ks = [k] * (len(shape) - 1) if isinstance(k, int) else k
            ss = [s] * (len(shape) - 1) if isinstance(s, int) else s
            shape = [shape[0]] + [(n - a) // b + 1 for n, a, b in zip(shape[1:], ks, ss)]
        elif kind == "gap":
            modules += [nn.AdaptiveAvgPool1d(1) if len(shape) == 2 else nn.AdaptiveAvgPool2d(1),
                        nn.Flatten()]
            shape = [shape[0]]
        elif kind == "flatten":
            modules.append(nn.Flatten())
            shape = [math.prod(shape)]
        elif kind == "layernorm":
            modules.append(nn.LayerNorm(shape, eps=eps, elementwise_affine=False))
        elif kind == "residual":
            block = build(layer[1], shape, eps)
            modules.append(Residual(block))
        else:
            raise AssertionError(kind)
    return nn.Sequential(*modules).double()


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _nt_cases():
    if not os.path.exists(DATA):
        return []
    data = np.load(DATA)
    return [json.loads(str(data[f"spec_{i}"])) | {"index": i} for i in range(int(data["count"]))]


@pytest.mark.parametrize("spec", _nt_cases(), ids=lambda s: s["name"])
@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_matches_neural_tangents(spec, native):
    if native and not NATIVE:
        pytest.skip("the native core is not compiled")
    data, i = np.load(DATA), spec["index"]
    model = build(spec["layers"], spec["input_shape"])
    x1, x2 = (torch.from_numpy(data[f"{n}_{i}"]) for n in ("x1", "x2"))
    # Measured: at most 3e-15 off the diagonal (GELU too, by the Hermite series). On the
    # diagonal of x2=None neural-tangents' E[φ'φ'] at correlation 1 carries O(sqrt(eps))
    # rounding (0.74999999 for 0.75); the library snaps correlations within 8 ulps of ±1.
    with _native(native):
        sym = torch_ntk.analytic_ntk(model, x1, get=("nngp", "ntk"))
        cross = torch_ntk.analytic_ntk(model, x1, x2, get=("nngp", "ntk"))
    for got, name in ((sym.nngp, "nngp_sym"), (sym.ntk, "ntk_sym"), (cross.nngp, "nngp"),
                      (cross.ntk, "ntk")):
        ref = torch.from_numpy(data[f"{name}_{i}"])
        off = ~torch.eye(*ref.shape, dtype=torch.bool) if name.endswith("sym") else ...
        assert _rel(got[off], ref[off]) < 1e-12, name
        assert _rel(got, ref) < 1e-8, name


def _native(on: bool):
    """The native core as compiled, or switched off."""
    return contextlib.nullcontext() if on else route.native_disabled()


def _conv_zoo():
    c1, c2 = torch_ntk.NTKConv1d, torch_ntk.NTKConv2d
    return {
        "same-valid-stride": (nn.Sequential(
            c2(2, 5, 3, padding="same", b_std=0.2), nn.ReLU(),
            c2(5, 5, (3, 2), stride=(1, 2), dilation=(2, 1), padding=1, w_std=1.3), torch_ntk.Erf(),
            c2(5, 5, 2, stride=2, padding="same"), nn.LeakyReLU(0.3),
            nn.Flatten(), torch_ntk.NTKLinear(5 * 3 * 2, 3, w_std=1.1, b_std=0.1)), (2, 7, 6)),
        "pooled": (nn.Sequential(
            c2(2, 4, 3, padding="same", b_std=0.2), nn.LeakyReLU(0.2),
            c2(4, 4, 3, stride=2, padding="same", w_std=1.3), nn.ReLU(), nn.AvgPool2d(2, 1),
            c2(4, 4, (1, 2), padding="valid"), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), torch_ntk.NTKLinear(4, 1, w_std=1.1)), (2, 7, 6)),
        "conv1d": (nn.Sequential(
            c1(2, 4, 3, padding="same"), nn.ReLU(), c1(4, 4, 5, stride=2, padding="valid",
                                                     b_std=0.5), nn.ReLU(),
            nn.AvgPool1d(2), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
            torch_ntk.NTKLinear(4, 1, w_std=1.0)), (2, 11)),
        "tanh-residual": (nn.Sequential(
            c2(1, 4, 3, padding="same"), Residual(nn.Sequential(nn.ReLU(), c2(4, 4, 3, padding=1))),
            nn.Tanh(), nn.Flatten(), torch_ntk.NTKLinear(4 * 5 * 5, 1, w_std=1.0)), (1, 5, 5)),
    }


@pytest.mark.parametrize("name", list(_conv_zoo()))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("distinct", [False, True])
def test_native_matches_the_torch_rules(name, dtype, distinct):
    if not NATIVE:
        pytest.skip("the native core is not compiled")
    model, shape = _conv_zoo()[name]
    torch.manual_seed(0)
    x1 = torch.randn(7, *shape, dtype=dtype)
    x2 = torch.randn(4, *shape, dtype=dtype) if distinct else None
    fast = torch_ntk.analytic_ntk(model, x1, x2, get=("nngp", "ntk"), batch_size=3)
    with route.native_disabled():
        ref = torch_ntk.analytic_ntk(model, x1, x2, get=("nngp", "ntk"), batch_size=5)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert fast.ntk.dtype == dtype
    assert _rel(fast.ntk, ref.ntk) < tol and _rel(fast.nngp, ref.nngp) < tol


@pytest.mark.parametrize("name", list(_conv_zoo()))
def test_position_pairs_only_where_needed(name, monkeypatch):
    """The diagonal layout gives what keeping every position pair gives."""
    model, shape = _conv_zoo()[name]
    x = torch.randn(5, *shape, dtype=torch.float64)
    lean = torch_ntk.analytic_ntk(model, x, get=("nngp", "ntk"))
    monkeypatch.setattr(program, "_layouts", _all_full)
    full = torch_ntk.analytic_ntk(model, x, get=("nngp", "ntk"))
    assert _rel(lean.ntk, full.ntk) < 1e-13 and _rel(lean.nngp, full.nngp) < 1e-13


def _all_full(prog):
    for node in prog.nodes:
        node.full = node.shape.positions > 1


def test_pool_free_network_keeps_no_position_pairs():
    model, shape = _conv_zoo()["same-valid-stride"]
    prog = program.plan(program.trace(model), shape)
    assert not any(node.full for node in prog.nodes)
    assert prog.pair_entries == 7 * 6
    pooled, shape = _conv_zoo()["pooled"]
    prog = program.plan(program.trace(pooled), shape)
    assert prog.nodes[0].full and prog.pair_entries == (7 * 6) ** 2


@pytest.mark.parametrize("act", ["relu", "erf", "tanh", "gelu"])
def test_ntkmlp_equals_the_depth_form(act):
    torch.manual_seed(0)
    x = torch.randn(9, 3, dtype=torch.float64)
    net = torch_ntk.NTKMLP(3, 16, depth=4, activation=act, w_std=1.2, b_std=0.3)
    got = torch_ntk.analytic_ntk(net, x, x[:4], get=("nngp", "ntk"))
    ref = torch_ntk.analytic_ntk(x, x[:4], depth=4, activation=act, w_std=1.2, b_std=0.3,
                                 get=("nngp", "ntk"))
    assert _rel(got.ntk, ref.ntk) < 1e-13 and _rel(got.nngp, ref.nngp) < 1e-13


def test_dense_layers_and_functional_forms():
    """F.relu, torch.flatten, x.mean(spatial axes), constant factors, a dense residual."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch_ntk.NTKConv2d(2, 4, 3, padding="same")
            self.fc1 = torch_ntk.NTKLinear(4, 6, w_std=1.3, b_std=0.2)
            self.fc2 = torch_ntk.NTKLinear(6, 6, w_std=0.7)
            self.out = torch_ntk.NTKLinear(6, 2, w_std=1.0)

        def forward(self, x):
            h = F.relu(self.conv(x)).mean((2, 3))
            z = self.fc1(h)
            z = z + 0.5 * self.fc2(torch.erf(z))
            return self.out(torch.relu(z))

    class Modules(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net
            self.seq = nn.Sequential(net.conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                     net.fc1)
            self.branch = nn.Sequential(torch_ntk.Erf(), net.fc2)

        def forward(self, x):
            z = self.seq(x)
            return self.net.out(F.relu(z + self.branch(z) * 0.5))

    net = Net().double()
    x = torch.randn(6, 2, 5, 5, dtype=torch.float64)
    a = torch_ntk.analytic_ntk(net, x, get=("nngp", "ntk"))
    b = torch_ntk.analytic_ntk(Modules(net), x, get=("nngp", "ntk"))
    assert _rel(a.ntk, b.ntk) < 1e-14 and _rel(a.nngp, b.nngp) < 1e-14


def test_residual_adds_the_branch_kernels():
    """K(x + block(x)) = K(x) + K(block(x)) when block ends in an NTK layer."""
    conv = torch_ntk.NTKConv2d(1, 4, 3, padding="same")
    block = nn.Sequential(nn.ReLU(), torch_ntk.NTKConv2d(4, 4, 3, padding="same", b_std=0.4))
    head = [nn.Flatten(), torch_ntk.NTKLinear(4 * 25, 1, w_std=1.0)]
    x = torch.randn(5, 1, 5, 5, dtype=torch.float64)
    whole = torch_ntk.analytic_ntk(nn.Sequential(conv, Residual(block), *head), x,
                                   get=("nngp", "ntk"))
    skip = torch_ntk.analytic_ntk(nn.Sequential(conv, *head), x, get=("nngp", "ntk"))
    branch = torch_ntk.analytic_ntk(nn.Sequential(conv, block, *head), x, get=("nngp", "ntk"))
    assert _rel(whole.nngp, skip.nngp + branch.nngp) < 1e-13
    # The NTK adds too, and counts the shared conv's gradient through both branches.
    assert torch.all(whole.ntk > skip.ntk)


@pytest.mark.parametrize("tile", [1, 2, 5, 64])
def test_tiles_that_do_not_divide_n(tile):
    model, shape = _conv_zoo()["pooled"]
    x = torch.randn(7, *shape, dtype=torch.float64)
    ref = torch_ntk.analytic_ntk(model, x)
    got = torch_ntk.analytic_ntk(model, x, batch_size=tile)
    assert _rel(got, ref) < 1e-14
    assert torch.equal(got, got.T)
    cross = torch_ntk.analytic_ntk(model, x, x[2:5], batch_size=tile)
    assert _rel(cross, ref[:, 2:5]) < 1e-13


def test_empirical_kernel_converges_with_width():
    """empirical_ntk(model, x, mode="trace") / K -> analytic_ntk(model, x), error ~ width^-1/2."""
    def make(c):
        conv = torch_ntk.NTKConv2d
        return nn.Sequential(conv(1, c, 3, padding="same", b_std=0.1), nn.ReLU(),
                             conv(c, c, 3, stride=2, padding="same"), nn.ReLU(), nn.AvgPool2d(2),
                             nn.Flatten(), torch_ntk.NTKLinear(c, 2, w_std=1.0)).double()
    x = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    limit = torch_ntk.analytic_ntk(make(1), x)
    errors = []
    torch.manual_seed(0)
    for width in (16, 256):
        e = [float(torch.linalg.norm(torch_ntk.empirical_ntk(make(width), x, mode="trace") / 2
                                     - limit) / torch.linalg.norm(limit)) for _ in range(4)]
        errors.append(sum(e) / len(e))
    slope = math.log(errors[1] / errors[0]) / math.log(16)
    assert errors[1] < 0.1 and -0.9 < slope < -0.3, (errors, slope)


def test_does_not_touch_the_model():
    model, shape = _conv_zoo()["tanh-residual"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    torch_ntk.analytic_ntk(model, torch.randn(3, *shape, dtype=torch.float64))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_low_precision_inputs_are_computed_in_float32():
    model, shape = _conv_zoo()["conv1d"]
    x = torch.randn(4, *shape, dtype=torch.float64)
    ref = torch_ntk.analytic_ntk(model, x)
    got = torch_ntk.analytic_ntk(model.to(torch.bfloat16), x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert _rel(got.double(), ref) < 3e-2


# Errors

def _raises(model, x, match, x2=None):
    with pytest.raises(ValueError, match=match):
        torch_ntk.analytic_ntk(model, x, x2)


def test_unsupported_modules_are_named():
    x = torch.randn(3, 1, 6, 6)
    _raises(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), torch_ntk.NTKLinear(32, 1)), x,
            r"0 \(Conv2d\).*torch_ntk.NTKConv2d.*Supported")
    _raises(nn.Sequential(torch_ntk.NTKConv2d(1, 2, 3), nn.MaxPool2d(2), nn.Flatten(),
                          torch_ntk.NTKLinear(8, 1)), x, r"MaxPool2d.*monte_carlo_ntk")
    _raises(nn.Sequential(torch_ntk.NTKConv2d(1, 2, 3), nn.BatchNorm2d(2)), x, "BatchNorm2d")
    _raises(nn.Sequential(torch_ntk.NTKConv2d(1, 2, 3), nn.AvgPool2d(2, padding=1)), x,
            "padding=0")
    _raises(nn.Sequential(torch_ntk.NTKLinear(36, 2), nn.LayerNorm(2)), x.flatten(1),
            "affine")
    _raises(torch_ntk.NTKMLP(36, 8, 2, parameterization="standard"), x.flatten(1),
            "parameterization='ntk'")


def test_dependent_branches_are_refused():
    class SelfGate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch_ntk.NTKLinear(3, 4, w_std=1.0)
            self.out = torch_ntk.NTKLinear(4, 1, w_std=1.0)

        def forward(self, x):
            z = self.fc(x)
            return self.out(z + torch.relu(z))

    _raises(SelfGate(), torch.randn(3, 3), "covariance doesn't vanish")


def test_integer_constants_are_constants():
    """The 1 of torch.flatten(x, 1), an int factor and an int shift are constants, never read
    as the network's value number 1 or 2."""
    class Net(nn.Module):
        def __init__(self, factor, shift=None):
            super().__init__()
            self.conv = torch_ntk.NTKConv2d(2, 3, 3, padding="same")
            self.fc = torch_ntk.NTKLinear(3 * 16, 1, w_std=1.0)
            self.factor, self.shift = factor, shift

        def forward(self, x):
            h = self.factor * torch.relu(self.conv(x))
            return self.fc(torch.flatten(h if self.shift is None else h + self.shift, 1))

    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    plain = nn.Sequential(torch_ntk.NTKConv2d(2, 3, 3, padding="same"), nn.ReLU(), nn.Flatten(),
                          torch_ntk.NTKLinear(3 * 16, 1, w_std=1.0))
    assert _rel(torch_ntk.analytic_ntk(Net(1), x), torch_ntk.analytic_ntk(plain, x)) < 1e-15
    assert _rel(torch_ntk.analytic_ntk(Net(2), x), 4 * torch_ntk.analytic_ntk(plain, x)) < 1e-14
    for shift in (0, 1, 2):
        _raises(Net(1, shift), x, "no infinite-width rule")


def test_layernorm_needs_a_centred_input():
    net = nn.Sequential(torch_ntk.NTKLinear(3, 4, w_std=1.0), nn.ReLU(),
                        nn.LayerNorm(4, elementwise_affine=False), torch_ntk.NTKLinear(4, 1))
    _raises(net, torch.randn(3, 3), "zero mean over the channels")
    over_width = nn.Sequential(torch_ntk.NTKConv2d(1, 2, 3, padding="same"),
                               nn.LayerNorm(6, elementwise_affine=False))
    _raises(over_width, torch.randn(3, 1, 6, 6), "all non-batch axes")


def test_shared_weights_and_shapes_are_refused():
    fc = torch_ntk.NTKLinear(3, 3, w_std=1.0)
    _raises(nn.Sequential(fc, nn.ReLU(), fc), torch.randn(2, 3), "called more than once")
    _raises(nn.Sequential(torch_ntk.NTKConv2d(1, 2, 3)), torch.randn(2, 1, 5, 5),
            "spatial shape")
    _raises(nn.Sequential(torch_ntk.NTKConv2d(3, 2, 3)), torch.randn(2, 1, 5, 5),
            "expects 3 input channels")
    _raises(nn.Sequential(torch_ntk.NTKConv2d(1, 2, 3), torch_ntk.NTKLinear(2, 1)),
            torch.randn(2, 1, 5, 5), "flatten it first")
    _raises(nn.Sequential(torch_ntk.NTKLinear(3, 1)), torch.randn(2, 3), "shape",
            x2=torch.randn(2, 4))


def test_untraceable_forward_and_bad_options():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch_ntk.NTKLinear(3, 1, w_std=1.0)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    _raises(Branchy(), torch.randn(2, 3), "torch.fx")
    net = torch_ntk.NTKMLP(3, 8, 2)
    with pytest.raises(ValueError, match="depth"):
        torch_ntk.analytic_ntk(net, torch.randn(2, 3), depth=2)
    with pytest.raises(TypeError, match="inputs after the model"):
        torch_ntk.analytic_ntk(net)
    with pytest.raises(TypeError, match="floating-point"):
        torch_ntk.analytic_ntk(net, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        torch_ntk.analytic_ntk(net, torch.full((2, 3), float("nan")))


# The layers

def test_ntk_conv_same_padding_with_stride_matches_ceil():
    conv = torch_ntk.NTKConv2d(2, 3, (3, 4), stride=(2, 3), padding="same", b_std=0.5)
    x = torch.randn(2, 2, 7, 8)
    assert conv(x).shape == (2, 3, 4, 3)
    assert conv.output_size((7, 8)) == (4, 3)
    ref = F.conv2d(F.pad(x, [1, 2, 1, 1]), conv.weight, stride=(2, 3)) * conv.weight_scale
    assert torch.allclose(conv(x), ref + 0.5 * conv.bias[:, None, None], atol=1e-6)
    assert torch_ntk.NTKConv1d(2, 3, 3).bias is None


def test_ntk_linear_w_std():
    layer = torch_ntk.NTKLinear(16, 3, w_std=2.0, b_std=0.5)
    assert layer.weight_scale == 0.5 and layer.bias_scale == 0.5 and layer.w_std == 2.0
    assert torch_ntk.NTKLinear(16, 3, w_std=2.0).bias is None
    assert torch_ntk.NTKLinear(16, 3).weight_scale == 1.0
    with pytest.raises(ValueError, match="not both"):
        torch_ntk.NTKLinear(4, 2, w_std=1.0, weight_scale=0.5)
    with pytest.raises(ValueError, match="padding"):
        torch_ntk.NTKConv2d(1, 1, 3, padding="full")


def test_structured_engine_reads_ntk_convs():
    from conftest import autograd_ntk
    torch.manual_seed(0)
    model = nn.Sequential(torch_ntk.NTKConv2d(2, 3, 3, stride=2, padding="same", b_std=0.3,
                                              w_std=1.2), nn.ReLU(), nn.Flatten(),
                          torch_ntk.NTKLinear(3 * 3 * 3, 2, w_std=1.1, b_std=0.2)).double()
    x = torch.randn(5, 2, 5, 6, dtype=torch.float64)
    ref = autograd_ntk(model, x, x)
    got = torch_ntk.empirical_ntk(model, x, method="structured")
    assert _rel(got, ref) < 1e-12


# The native ops

def _chain_args(full, with_t=True, ntk=True, dtype=torch.float64):
    """A chain of a strided conv + relu, a pooling (full layout), a 1x1 conv + erf and a
    conv without activation on (2, 3) pairs of 5x4 maps, as the op's arguments."""
    torch.manual_seed(0)
    shape = (2, 3, 5, 4, 5, 4) if full else (2, 3, 5, 4)
    k = torch.rand(shape, dtype=dtype)
    t = torch.rand(shape, dtype=dtype) if with_t else None
    steps = [pairs.Step("conv", (3, 2), (1, 2), (5, 2), (1, 1), (1, 0), 1.5, 0.1, "relu")]
    if full:
        steps.append(pairs.Step("pool", (2, 1), (1, 1), (4, 2)))
    size = (4, 2) if full else (5, 2)
    steps += [pairs.Step("conv", (1, 1), (1, 1), size, w2=0.7, b2=0.2, act="erf"),
              pairs.Step("conv", (2, 2), (1, 1), size, (1, 1), (1, 1), 1.2, 0.0)]
    s1 = [torch.rand(2, 5, 2, dtype=dtype) + 1, torch.rand(2, *size, dtype=dtype) + 0.5]
    s2 = [torch.rand(3, 5, 2, dtype=dtype) + 1, torch.rand(3, *size, dtype=dtype) + 0.5]
    return k, t, steps, s1, s2


@pytest.mark.skipif(not NATIVE, reason="the native core is not compiled")
@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("with_t,ntk", [(True, True), (False, True), (True, False)])
def test_opcheck_pair_chain(full, with_t, ntk):
    k, t, steps, s1, s2 = _chain_args(full, with_t)
    ints, scales = [], []
    for step in steps:
        i, f = step.encode()
        ints, scales = ints + i, scales + f
    torch.library.opcheck(torch.ops.torch_ntk.pair_chain, (k, t, s1, s2, ints, scales, full, ntk))


@pytest.mark.skipif(not NATIVE, reason="the native core is not compiled")
@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("with_t", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pair_chain_equals_its_steps_one_by_one(full, with_t, dtype):
    """Running the steps on a few pairs at a time in one call changes nothing."""
    k, t, steps, s1, s2 = _chain_args(full, with_t, dtype=dtype)
    k1, t1 = pairs.chain(k, t, steps, s1, s2, full=full, ntk=True)
    side = 0
    for step in steps:
        n = step.act != "none"
        k, t = pairs.chain(k, t, [step], s1[side:side + n], s2[side:side + n], full=full,
                           ntk=True)
        side += n
    tol = 1e-14 if dtype == torch.float64 else 1e-6
    assert _rel(k1, k) < tol and _rel(t1, t) < tol
    knn, tnn = pairs.chain(*_chain_args(full, with_t, dtype=dtype)[:2],
                           _chain_args(full)[2], s1, s2, full=full, ntk=False)
    assert tnn is None and _rel(knn, k1) < tol


@pytest.mark.skipif(not NATIVE, reason="the native core is not compiled")
def test_pair_chain_refuses_bad_arguments():
    k, t, steps, s1, s2 = _chain_args(True)
    with pytest.raises(RuntimeError, match="s1 must be"):
        pairs.chain(k, t, steps, [s1[1], s1[1]], s2, full=True, ntk=True)
    with pytest.raises(RuntimeError, match="one s1 and one s2 per step"):
        pairs.chain(k, t, steps, s1[:1], s2[:1], full=True, ntk=True)
    with pytest.raises(RuntimeError, match="pooling .* needs the full layout"):
        pairs.chain(k[:, :, :, :, 0, 0], None, [pairs.Step("pool", (2, 2), (1, 1), (4, 3))], [],
                    [], full=False, ntk=True)
    with pytest.raises(RuntimeError, match="reads past its input"):
        pairs.chain(k, None, [pairs.Step("pool", (2, 2), (2, 2), (3, 2))], [], [], full=True,
                    ntk=True)
    with pytest.raises(RuntimeError, match="act codes"):
        torch.ops.torch_ntk.pair_chain(k, None, [], [], [0, 7] + [1] * 10, [1.0, 0.0, 0.0],
                                       True, True)
    with pytest.raises(RuntimeError, match="ints and 3 scales per step"):
        torch.ops.torch_ntk.pair_chain(k, None, [], [], [0, 0, 1], [1.0], True, True)


@pytest.mark.parametrize("dims,kernel,stride,dilation,padding", [
    (2, 3, 1, 1, "same"), (2, (3, 2), (2, 1), (1, 2), "same"), (2, 2, 2, 1, "valid"),
    (2, (1, 3), 1, 1, (0, 2)), (1, 3, 2, 2, "same"), (1, 4, 1, 1, 1)])
@pytest.mark.parametrize("full", [True, False])
@pytest.mark.parametrize("aligned", [False, True])
def test_input_window_equals_the_window_mean_of_the_input_kernel(dims, kernel, stride, dilation,
                                                                 padding, full, aligned):
    from torch_ntk.infinite.rules.affine import Conv, window_mean
    from torch_ntk.infinite.rules.base import Orientation, Shape
    from torch_ntk.infinite.rules.structure import Input
    layer = (torch_ntk.NTKConv2d if dims == 2 else torch_ntk.NTKConv1d)(
        3, 2, kernel, stride=stride, dilation=dilation, padding=padding)
    spatial = (7, 6) if dims == 2 else (9,)
    rule = Conv(layer, "conv")
    out_spatial = rule.shape([Shape(channels=3, spatial=spatial)]).spatial
    x1 = torch.randn(4, 3, *spatial, dtype=torch.float64)
    x2 = x1 if aligned else torch.randn(5, 3, *spatial, dtype=torch.float64)
    inp = Input().kernel(x1, x2, full, aligned).nngp
    ref = window_mean(inp, Orientation(full, spatial, aligned), layer.kernel_size, layer.stride,
                      layer.dilation, rule.pads, diagonal_window=True)
    out = Orientation(full, out_spatial, aligned)
    got = rule.input_window(x1, x2, out)
    assert got.shape == ref.shape and _rel(got, ref) < 1e-14
    buffer = torch.full((got.numel() + 3,), float("nan"), dtype=torch.float64)
    assert _rel(rule.input_window(x1, x2, out, buffer), ref) < 1e-14


@pytest.mark.skipif(not torch.cuda.is_available() or not torch_ntk.native.info()["cuda"],
                    reason="needs a CUDA device and the CUDA kernel compiled in")
@pytest.mark.parametrize("name", list(_conv_zoo()))
def test_cuda_matches_cpu(name):
    model, shape = _conv_zoo()[name]
    x = torch.randn(6, *shape, dtype=torch.float64)
    ref = torch_ntk.analytic_ntk(model, x, get=("nngp", "ntk"))
    got = torch_ntk.analytic_ntk(model, x.cuda(), get=("nngp", "ntk"))
    assert _rel(got.ntk.cpu(), ref.ntk) < 1e-12 and _rel(got.nngp.cpu(), ref.nngp) < 1e-12


def test_values_read_again_after_a_pass_through_are_not_overwritten():
    """z feeds dropout -> fc2 and, later, the sum: fc2 must not reuse z's tensors."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch_ntk.NTKLinear(3, 4, w_std=1.0)
            self.drop = nn.Dropout(0.0)
            self.fc2 = torch_ntk.NTKLinear(4, 4, w_std=1.3, b_std=0.2)
            self.out = torch_ntk.NTKLinear(4, 1, w_std=1.0)

        def forward(self, x):
            z = self.fc1(x)
            return self.out(torch.relu(self.fc2(self.drop(z)) + z))

    class Plain(Net):
        def forward(self, x):
            z = self.fc1(x)
            return self.out(torch.relu(self.fc2(z) + z))

    x = torch.randn(5, 3, dtype=torch.float64)
    a = torch_ntk.analytic_ntk(Net(), x, get=("nngp", "ntk"))
    b = torch_ntk.analytic_ntk(Plain(), x, get=("nngp", "ntk"))
    assert torch.equal(a.ntk, b.ntk) and torch.equal(a.nngp, b.nngp)


def test_hooks_and_parametrisations_are_refused():
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    net = nn.Sequential(torch_ntk.NTKLinear(3, 4, w_std=1.0), nn.ReLU(),
                        torch_ntk.NTKLinear(4, 1, w_std=1.0))
    x = torch.randn(3, 3)
    handle = net[1].register_forward_hook(lambda m, i, o: o * 2)
    _raises(net, x, r"1 \(ReLU\) has forward hooks")
    handle.remove()
    handle = net.register_forward_pre_hook(lambda m, i: (i[0] * 2,))
    _raises(net, x, "Sequential.*forward hooks")
    handle.remove()
    parametrize.register_parametrization(net[0], "weight", Double())
    _raises(net, x, "parametrised")
    parametrize.remove_parametrizations(net[0], "weight")
    assert torch_ntk.analytic_ntk(net, x).shape == (3, 3)


@pytest.mark.parametrize("dims", [1, 2])
def test_functional_pooling_equals_the_modules(dims):
    conv = torch_ntk.NTKConv2d if dims == 2 else torch_ntk.NTKConv1d
    pool = F.avg_pool2d if dims == 2 else F.avg_pool1d
    gap = F.adaptive_avg_pool2d if dims == 2 else F.adaptive_avg_pool1d
    window = (2, 1) if dims == 2 else 2

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = conv(2, 3, 3, padding="same")
            self.b = conv(3, 3, 2)
            self.fc = torch_ntk.NTKLinear(3, 1, w_std=1.0)

        def forward(self, x):
            h = torch.relu(self.b(pool(torch.relu(self.a(x)), window, stride=1)))
            return self.fc(gap(h, 1).flatten(1))

    class Modules(Functional):
        def __init__(self):
            super().__init__()
            self.pool = (nn.AvgPool2d if dims == 2 else nn.AvgPool1d)(window, stride=1)
            self.gap = (nn.AdaptiveAvgPool2d if dims == 2 else nn.AdaptiveAvgPool1d)(1)

        def forward(self, x):
            h = torch.relu(self.b(self.pool(torch.relu(self.a(x)))))
            return self.fc(torch.flatten(self.gap(h), 1))

    torch.manual_seed(0)
    x = torch.randn(5, 2, *((5, 5) if dims == 2 else (7,)), dtype=torch.float64)
    got = torch_ntk.analytic_ntk(Functional(), x, get=("nngp", "ntk"))
    ref = torch_ntk.analytic_ntk(Modules(), x, get=("nngp", "ntk"))
    assert _rel(got.ntk, ref.ntk) < 1e-15 and _rel(got.nngp, ref.nngp) < 1e-15

    class Padded(Functional):
        def forward(self, x):
            return self.fc(gap(pool(self.a(x), 2, padding=1), 1).flatten(1))

    _raises(Padded(), x, f"avg_pool{dims}d.*no infinite-width rule")
