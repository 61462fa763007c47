"""Every method and mode of empirical_ntk against the torch.func reference."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_ntk
from torch_ntk.native import route
from conftest import DEVICES, ZOO, assert_close, autograd_ntk, make

MODES = ("full", "trace", "diagonal")


@pytest.mark.parametrize("name", ["mlp_tanh", "conv2d", "sequence", "embedding"])
def test_jacobian_matches_brute_force(name):
    model, x1, x2 = make(name, torch.float64, 4, 3)
    expected = autograd_ntk(model, x1, x2)
    actual = torch_ntk.empirical_ntk(model, x1, x2, method="jacobian")
    assert_close(actual, expected, torch.float64, f"jacobian vs autograd on {name}")


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("method", ["structured", "auto"])
def test_methods_match_reference_float64(name, method):
    model, x1, x2 = make(name, torch.float64, 7, 4)
    for mode in MODES:
        for other in (None, x2):
            ref = torch_ntk.empirical_ntk(model, x1, other, mode=mode, method="jacobian")
            got = torch_ntk.empirical_ntk(model, x1, other, mode=mode, method=method,
                                          batch_size=3)
            assert_close(got, ref, torch.float64,
                         f"{method} on {name}, mode={mode}, x2={'None' if other is None else 'x2'}")


@pytest.mark.parametrize("name", ["mlp_k10", "residual", "conv2d", "sequence"])
def test_structured_float32(name):
    model, x1, x2 = make(name, torch.float32, 9, 5)
    for mode in MODES:
        ref = torch_ntk.empirical_ntk(model.double(), x1.double() if x1.is_floating_point()
                                      else x1, x2.double() if x2.is_floating_point() else x2,
                                      mode=mode, method="jacobian").float()
        model.float()
        got = torch_ntk.empirical_ntk(model, x1, x2, mode=mode, method="structured")
        assert got.dtype == torch.float32
        assert_close(got, ref, torch.float32, f"structured float32 on {name}, mode={mode}")


@pytest.mark.parametrize("batch_size", [1, 2, 5, 7, 100])
@pytest.mark.parametrize("method", ["structured", "jacobian"])
def test_batch_size_does_not_change_result(batch_size, method):
    model, x1, x2 = make("mlp_k10", torch.float64, 7, 6)
    ref = torch_ntk.empirical_ntk(model, x1, method="jacobian", batch_size=7)
    got = torch_ntk.empirical_ntk(model, x1, method=method, batch_size=batch_size)
    assert_close(got, ref, torch.float64, f"{method}, batch_size={batch_size}, x2=None")
    ref = torch_ntk.empirical_ntk(model, x1, x2, mode="diagonal", method="jacobian")
    got = torch_ntk.empirical_ntk(model, x1, x2, mode="diagonal", method=method,
                                  batch_size=batch_size)
    assert_close(got, ref, torch.float64, f"{method}, batch_size={batch_size}, distinct x2")


def test_symmetric_result_is_symmetric():
    model, x1, _ = make("residual", torch.float64, 11, 1)
    k = torch_ntk.empirical_ntk(model, x1, batch_size=4)
    assert torch.equal(k, k.permute(1, 0, 3, 2))


def test_single_sample_and_single_output():
    model, x1, x2 = make("scalar_output", torch.float64, 1, 1)
    k = torch_ntk.empirical_ntk(model, x1, x2)
    assert k.shape == (1, 1, 1, 1)
    ref = torch_ntk.empirical_ntk(model, x1, x2, method="jacobian")
    assert_close(k, ref, torch.float64, "N=1, K=1")
    trace = torch_ntk.empirical_ntk(model, x1, mode="trace")
    assert trace.shape == (1, 1) and float(trace) > 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_out_is_filled_and_returned(mode, symmetric):
    model, x1, x2 = make("mlp_k10", torch.float64, 7, 5)
    other = None if symmetric else x2
    ref = torch_ntk.empirical_ntk(model, x1, other, mode=mode, method="jacobian")
    out = torch.full(ref.shape, float("nan"), dtype=torch.float64)
    got = torch_ntk.empirical_ntk(model, x1, other, mode=mode, batch_size=3, out=out)
    assert got is out
    assert_close(out, ref, torch.float64, f"out= in mode {mode}")


def test_out_may_be_a_strided_view():
    model, x1, x2 = make("mlp_k10", torch.float64, 7, 5)
    big = torch.zeros(9, 8, dtype=torch.float64)
    view = big[1:8, 2:7]
    torch_ntk.empirical_ntk(model, x1, x2, mode="trace", batch_size=3, out=view)
    ref = torch_ntk.empirical_ntk(model, x1, x2, mode="trace", method="jacobian")
    assert_close(big[1:8, 2:7], ref, torch.float64, "out= view")
    assert float(big[0].abs().sum() + big[:, :2].abs().sum()) == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_result_on_model_device_with_model_dtype(device):
    model, x1, _ = make("mlp_relu", torch.float32, 4, 1)
    model, x1 = model.to(device), x1.to(device)
    k = torch_ntk.empirical_ntk(model, x1, mode="diagonal")
    assert k.device.type == device and k.dtype == torch.float32 and k.shape == (4, 4, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_compute_streams_into_host_out():
    model, x1, _ = make("mlp_k10", torch.float64, 33, 1)
    ref = torch_ntk.empirical_ntk(model, x1, mode="trace", method="jacobian")
    out = torch.empty(33, 33, dtype=torch.float64)
    torch_ntk.empirical_ntk(model.cuda(), x1.cuda(), mode="trace", batch_size=8, out=out)
    assert_close(out, ref, torch.float64, "cuda -> host out=")


def test_auto_uses_jacobian_when_nothing_factorises():
    model = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.LayerNorm(6)).double()
    x = torch.randint(0, 5, (4, 2))
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            raise AssertionError("test model must not contain Linear layers")
    ref = torch_ntk.empirical_ntk(model, x, method="jacobian")
    got = torch_ntk.empirical_ntk(model, x, method="auto")
    assert_close(got, ref, torch.float64, "auto without factorisable layers")


@pytest.mark.parametrize("name", ["mlp_k10", "conv2d", "sequence"])
def test_pure_torch_fallback_matches_reference(name):
    model, x1, x2 = make(name, torch.float64, 7, 4)
    for mode in MODES:
        for other in (None, x2):
            ref = torch_ntk.empirical_ntk(model, x1, other, mode=mode, method="jacobian")
            with route.native_disabled():
                assert not torch_ntk.native.info()["cpu"]
                before = route.calls["native", "cpu"]
                got = torch_ntk.empirical_ntk(model, x1, other, mode=mode, method="structured",
                                              batch_size=3)
                assert route.calls["native", "cpu"] == before, "the native op ran"
            assert_close(got, ref, torch.float64, f"pure-torch structured on {name}, {mode}")


@pytest.mark.parametrize("name", sorted(ZOO))
def test_auto_stays_structured_on_the_zoo(name):
    """A wrong structured kernel makes auto fall back to the Jacobian silently: catch that."""
    from torch_ntk.empirical.api import KernelPlan
    model, x1, x2 = make(name, torch.float64, 5, 3)
    with KernelPlan(model, x1, x2) as plan:
        for i, j in plan.tiles():     # every block is checked here: a wrong rule shows now
            plan.compute_tile(i, j)
        reason = getattr(plan.engine, "reason", None)
        assert reason in (None, "cost", "forms"), \
            f"auto fell back to the Jacobian on {name}: {reason}"
    with KernelPlan(model, x1, x2, method="structured") as plan:
        for i, j in plan.tiles():
            plan.compute_tile(i, j)
        assert not plan.engine.foreign, f"{name}: {sorted(plan.engine.foreign)} left to the Jacobian"


def test_auto_weighs_how_per_sample_gradients_are_formed():
    """Where the structured contraction saves little, auto still takes the structured engine
    for a CNN whose convolutions hold most parameters (vmap forms their per-sample gradients
    slowly), and keeps the Jacobian for a Transformer (a catch-all attention layer)."""
    from torch_ntk.apps.demo import cnn
    from torch_ntk.empirical import api
    from torch_ntk.empirical.api import KernelPlan
    torch.manual_seed(0)
    model = cnn.build("gap", 16)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    with KernelPlan(model, x, mode="trace", method="structured") as plan:
        assert api._too_costly(plan.engine, plan.params, plan.k)   # saves little ...
    with KernelPlan(model, x, mode="trace") as plan:
        assert plan.engine.name == "structured" and plan.engine.reason == "forms"   # chosen
    ref = torch_ntk.empirical_ntk(model, x, mode="trace", method="jacobian")
    assert_close(torch_ntk.empirical_ntk(model, x, mode="trace"), ref, torch.float64, "gap CNN")
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    attention = nn.Sequential(layer, nn.Flatten(), nn.Linear(16 * 5, 3)).double().eval()
    with KernelPlan(attention, torch.randn(4, 5, 16, dtype=torch.float64)) as plan:
        assert plan.engine.name == "jacobian" and plan.engine.reason == "cost"
