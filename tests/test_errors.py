"""Each bad input of empirical_ntk raises a clear exception; the model is never changed."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torch_ntk
from conftest import make


def _state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [m.training for m in model.modules()],
            sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                for m in model.modules()))


def _assert_same_state(before, after):
    (sd0, g0, rg0, tr0, hooks0), (sd1, g1, rg1, tr1, hooks1) = before, after
    assert sd0.keys() == sd1.keys()
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]), f"{k} changed"
    for n in g0:
        assert (g0[n] is None) == (g1[n] is None) and (g0[n] is None or torch.equal(g0[n], g1[n]))
    assert rg0 == rg1 and tr0 == tr1 and hooks0 == hooks1


def test_unknown_mode_and_method():
    model, x, _ = make("mlp_relu", torch.float64, 3, 1)
    with pytest.raises(ValueError, match="mode must be one of"):
        torch_ntk.empirical_ntk(model, x, mode="diag")
    with pytest.raises(ValueError, match="method must be one of"):
        torch_ntk.empirical_ntk(model, x, method="fast")


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True])
def test_bad_batch_size(batch_size):
    model, x, _ = make("mlp_relu", torch.float64, 3, 1)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        torch_ntk.empirical_ntk(model, x, batch_size=batch_size)


def test_mismatched_feature_shapes():
    model, x, _ = make("mlp_relu", torch.float64, 3, 1)
    with pytest.raises(ValueError, match="must match after the batch dimension"):
        torch_ntk.empirical_ntk(model, x, torch.randn(2, 4, dtype=torch.float64))


def test_not_a_module_and_not_a_tensor():
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        torch_ntk.empirical_ntk(lambda x: x, torch.randn(2, 3))
    with pytest.raises(TypeError, match="x1 must be a torch.Tensor"):
        torch_ntk.empirical_ntk(nn.Linear(3, 2), [[1.0, 2.0, 3.0]])


def test_empty_batch():
    with pytest.raises(ValueError, match="non-empty batch dimension"):
        torch_ntk.empirical_ntk(nn.Linear(3, 2), torch.randn(0, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_input_on_other_device_than_model():
    model = nn.Linear(3, 2).cuda()
    with pytest.raises(ValueError, match="Move them to one device"):
        torch_ntk.empirical_ntk(model, torch.randn(2, 3))


def test_dtype_mismatch():
    with pytest.raises(ValueError, match="has dtype torch.float32 but the model's parameters"):
        torch_ntk.empirical_ntk(nn.Linear(3, 2).double(), torch.randn(2, 3))


def test_no_trainable_parameters():
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        torch_ntk.empirical_ntk(model, torch.randn(2, 3))


def test_batchnorm_in_training_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    before = _state(model)
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\) is in training mode"):
        torch_ntk.empirical_ntk(model, torch.randn(5, 3))
    _assert_same_state(before, _state(model))
    model.eval()
    k = torch_ntk.empirical_ntk(model, torch.randn(5, 3), mode="trace")
    assert k.shape == (5, 5)


def test_dropout_in_training_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="makes the output random"):
        torch_ntk.empirical_ntk(model, torch.randn(5, 3))


def test_dropout_with_zero_probability_in_training_mode_is_accepted():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.0), nn.Linear(4, 1)).double().train()
    x = torch.randn(4, 3, dtype=torch.float64)
    ref = torch_ntk.empirical_ntk(model, x, method="jacobian")
    torch.testing.assert_close(torch_ntk.empirical_ntk(model, x), ref)


class _BatchMixer(nn.Module):
    """Samples interact through the batch mean: not an NTK."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        return self.lin(x - x.mean(0, keepdim=True))


@pytest.mark.parametrize("method", ["auto", "structured", "jacobian"])
def test_samples_that_interact(method):
    with pytest.raises(ValueError, match="depends on the other samples"):
        torch_ntk.empirical_ntk(_BatchMixer(), torch.randn(4, 3), method=method)


class _Explodes(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, x):
        return self.lin(x) / (x[:, :1] - 1.0)


@pytest.mark.parametrize("method", ["structured", "jacobian"])
def test_non_finite_outputs(method):
    x = torch.randn(6, 3)
    x[4, 0] = 1.0  # division by zero for the fifth sample only
    with pytest.raises(ValueError, match="not finite"):
        torch_ntk.empirical_ntk(_Explodes(), x, method=method, batch_size=2)


def test_non_finite_inputs():
    x = torch.randn(3, 3)
    x[1, 1] = float("nan")
    with pytest.raises(ValueError, match="x1 contains NaN"):
        torch_ntk.empirical_ntk(nn.Linear(3, 1), x)


def test_model_output_not_a_tensor():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x), x

    with pytest.raises(TypeError, match="must return one Tensor"):
        torch_ntk.empirical_ntk(Pair(), torch.randn(2, 3))


def test_output_without_batch_dimension():
    class Total(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x).sum()

    with pytest.raises(ValueError, match="keep the batch dimension first"):
        torch_ntk.empirical_ntk(Total(), torch.randn(4, 3), method="jacobian")


class FoldedBatch(nn.Module):
    """The only layer sees the batch folded into its rows: no layer keeps samples on rows."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Linear(4, 2)

    def forward(self, x):
        return self.tok(x.reshape(-1, 4)).reshape(x.shape[0], -1)


def test_structured_without_usable_layer_names_the_module():
    with pytest.raises(ValueError, match=r"tok \(Linear\)"):
        torch_ntk.empirical_ntk(FoldedBatch(), torch.randn(3, 12), method="structured")


@pytest.mark.parametrize("shape, dtype", [((3, 3), torch.float64), ((3, 3, 2, 2), torch.float32)])
def test_bad_out(shape, dtype):
    model = nn.Linear(4, 2).double()
    with pytest.raises(ValueError, match=r"out must have shape \(3, 3, 2, 2\)"):
        torch_ntk.empirical_ntk(model, torch.randn(3, 4, dtype=torch.float64),
                                out=torch.empty(shape, dtype=dtype))
    with pytest.raises(TypeError, match="out must be a torch.Tensor"):
        torch_ntk.empirical_ntk(model, torch.randn(3, 4, dtype=torch.float64), out=[0.0])


@pytest.mark.parametrize("method", ["auto", "structured", "jacobian"])
@pytest.mark.parametrize("name", ["layernorm_affine", "conv2d", "sequence", "mlp_relu_inplace"])
def test_model_state_untouched(method, name):
    model, x1, x2 = make(name, torch.float64, 5, 3)
    model.register_buffer("counter", torch.zeros(1))
    model(x1).sum().backward()  # grads exist and must survive
    model.train()
    before = _state(model)
    reference = copy.deepcopy(model)
    torch_ntk.empirical_ntk(model, x1, x2, method=method, batch_size=2)
    _assert_same_state(before, _state(model))
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


def test_hooks_removed_after_an_error():
    model = _Explodes()
    x = torch.ones(3, 3)
    before = _state(model)
    with pytest.raises(ValueError):
        torch_ntk.empirical_ntk(model, x, method="structured")
    _assert_same_state(before, _state(model))


def test_buffers_restored_when_forward_mutates_them():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls += 1
            return self.lin(x)

    model = Counting()
    torch_ntk.empirical_ntk(model, torch.randn(4, 3))
    assert float(model.calls) == 0.0
