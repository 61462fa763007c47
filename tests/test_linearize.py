"""torch_ntk.linearize: value and Jacobian at θ0, copies, frozen parameters, training."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, jvp

import torch_ntk

F64 = torch.float64


def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 10), nn.LayerNorm(10), nn.Tanh(), nn.Linear(10, 2))
    model[1].weight.requires_grad_(False)  # one frozen parameter
    model.register_buffer("unused_stat", torch.arange(3.0))
    return model.to(F64)


def test_matches_model_and_jvp_at_theta0():
    model = _model()
    lin = torch_ntk.linearize(model)
    x = torch.randn(7, 3, dtype=F64)
    torch.testing.assert_close(lin(x), model(x), rtol=1e-14, atol=1e-14)

    # Move θ by a small step δ: f_lin(θ0 + δ) = f(θ0) + J δ, compared with torch.func.jvp.
    params0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    delta = {n: 1e-2 * torch.randn_like(p) for n, p in params0.items()}
    with torch.no_grad():
        for name, p in lin.module.named_parameters():
            if p.requires_grad:
                p.add_(delta[name])
    _, ref = jvp(lambda p: functional_call(model, p, (x,)), (params0,), (delta,))
    torch.testing.assert_close(lin(x), model(x) + ref, rtol=1e-12, atol=1e-12)
    # ... and it is linear: twice the step gives twice the change.
    with torch.no_grad():
        for name, p in lin.module.named_parameters():
            if p.requires_grad:
                p.add_(delta[name])
    torch.testing.assert_close(lin(x), model(x) + 2 * ref, rtol=1e-12, atol=1e-12)


def test_copy_frozen_and_buffers():
    model = _model()
    state = copy.deepcopy(model.state_dict())
    lin = torch_ntk.linearize(model)
    trainable = [n for n, p in lin.named_parameters() if p.requires_grad]
    frozen = [n for n, p in lin.named_parameters() if not p.requires_grad]
    assert trainable == ["module.0.weight", "module.0.bias", "module.1.bias", "module.3.weight",
                         "module.3.bias"]
    assert frozen == ["module.1.weight"]
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(lin.parameters(), model.parameters()))
    torch.testing.assert_close(lin.module.unused_stat, model.unused_stat)
    assert set(lin.theta0()) == {n[len("module."):] for n in trainable}

    x, y = torch.randn(9, 3, dtype=F64), torch.randn(9, 2, dtype=F64)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = ((lin(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, value in model.state_dict().items():  # the original model is untouched
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())
    named = dict(lin.named_parameters())
    torch.testing.assert_close(named["module.1.weight"], model[1].weight, rtol=0, atol=0)
    assert not torch.equal(named["module.0.weight"], model[0].weight)
    for name, value in lin.theta0().items():  # θ0 stays where it was
        torch.testing.assert_close(value, model.get_parameter(name), rtol=0, atol=0)


def test_training_flag_dtype_and_batched_inputs():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    lin = torch_ntk.linearize(model)
    assert not lin.training
    x = torch.randn(2, 5, 4)  # extra leading axes pass through
    assert lin(x).shape == (2, 5, 3)
    lin64 = torch_ntk.linearize(model.double())
    assert lin64(x.double()).dtype == F64


def test_errors():
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        torch_ntk.linearize(lambda x: x)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        torch_ntk.linearize(frozen)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 1)

    def forward(self, x):
        return self.a(x), {"b": torch.tanh(self.b(x))}


def test_tuple_and_dict_outputs_move_with_theta():
    model = TwoHeads().double()
    lin = torch_ntk.linearize(model)
    x = torch.randn(4, 3, dtype=torch.float64)
    (a0, d0) = lin(x)
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(0.1)
    (a1, d1) = lin(x)
    assert not torch.allclose(a0, a1) and not torch.allclose(d0["b"], d1["b"])
    (a0.sum() + d0["b"].sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lin.parameters())
