"""method="jacobian": the vmap path, the autograd path for models vmap can't run (recurrent
layers), the model left intact (modules registered twice, tied weights), output dtypes and
concurrent calls."""
from __future__ import annotations

import copy
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import torch_ntk
from torch_ntk.empirical import checks, jacobian
from torch_ntk.empirical.jacobian import JacobianNTK, PerSampleJacobian
from conftest import RecurrentModel, assert_close, autograd_jacobian, autograd_ntk, make

CELLS = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
METHODS = ("jacobian", "structured", "auto")


def _recurrent(cell: str, batch_first: bool, layers: int, bidirectional: bool) -> nn.Module:
    model = RecurrentModel(CELLS[cell], batch_first, num_layers=layers,
                           bidirectional=bidirectional)
    return model.double()


def _sequences(n: int) -> torch.Tensor:
    return torch.randn(n, 4, 3, dtype=torch.float64)


def _registrations(model: nn.Module) -> list[tuple[str, object]]:
    """Every (name, registered object) of the model, duplicates included."""
    return [(f"{prefix}.{attr}", p) for prefix, module in
            model.named_modules(remove_duplicate=False) for attr, p in module._parameters.items()]


def _assert_intact(model: nn.Module, before: list[tuple[str, object]]) -> None:
    after = _registrations(model)
    assert [name for name, _ in after] == [name for name, _ in before]
    for (name, p), (_, q) in zip(before, after):
        assert q is p, f"{name} was replaced by a {type(q).__name__}"
        assert type(q) is nn.Parameter and q.grad is None, name


# The contraction: per-parameter blocks, narrow ones pooled, through the Gram-sum op

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_jacobian_blocks_contract_exactly(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 80), nn.Tanh(),
                          nn.Linear(80, 3)).to(dtype)
    x1, x2 = torch.randn(13, 5, dtype=dtype), torch.randn(6, 5, dtype=dtype)
    engine = JacobianNTK(model, checks.check_model(model))
    widths = sorted(d.shape[2] for d in engine.factors(x1).d)
    assert widths == [5 * 64 + 64 + 80 + 80 * 3 + 3, 64 * 80], "wide block alone, narrow pooled"
    ref_model = copy.deepcopy(model).double()
    for other in (None, x2):
        want = autograd_ntk(ref_model, x1.double(), (x1 if other is None else other).double())
        for mode, reduce in (("full", lambda t: t), ("trace", lambda t: t.diagonal(
                dim1=2, dim2=3).sum(-1)), ("diagonal", lambda t: t.diagonal(dim1=2, dim2=3))):
            got = torch_ntk.empirical_ntk(model, x1, other, mode=mode, method="jacobian",
                                          batch_size=5)
            assert_close(got, reduce(want).to(dtype), dtype, f"{mode}, x2={other is not None}")
            if other is None:
                assert torch.equal(got, got.transpose(0, 1) if mode != "full"
                                   else got.permute(1, 0, 3, 2)), "not exactly symmetric"


# Recurrent layers: exact kernels although torch.func.vmap can't run them

@pytest.mark.parametrize("layers,bidirectional", [(1, False), (2, True)])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_recurrent_jacobian_is_exact(cell, batch_first, layers, bidirectional):
    model = _recurrent(cell, batch_first, layers, bidirectional)
    x1, x2 = _sequences(4), _sequences(3)
    expected = autograd_ntk(model, x1, x2)
    got = torch_ntk.empirical_ntk(model, x1, x2, method="jacobian", batch_size=2)
    assert got.shape == (4, 3, 2, 2)
    assert_close(got, expected, torch.float64, f"{cell} jacobian vs autograd")
    sym = torch_ntk.empirical_ntk(model, x1, mode="trace", method="jacobian", batch_size=3)
    want = autograd_ntk(model, x1, x1).diagonal(dim1=2, dim2=3).sum(-1)
    assert_close(sym, want, torch.float64, f"{cell} jacobian, x2=None, trace")


@pytest.mark.parametrize("method", ["structured", "auto"])  # jacobian: the test above
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_recurrent_structured_and_auto_are_exact(cell, method):
    model = _recurrent(cell, False, 2, True)
    x1, x2 = _sequences(3), _sequences(2)
    expected = autograd_ntk(model, x1, x2)
    got = torch_ntk.empirical_ntk(model, x1, x2, method=method, batch_size=2)
    assert_close(got, expected, torch.float64, f"{cell}, method={method}")
    diag = torch_ntk.empirical_ntk(model, x1, mode="diagonal", method=method, batch_size=2)
    want = autograd_ntk(model, x1, x1).diagonal(dim1=2, dim2=3)
    assert_close(diag, want, torch.float64, f"{cell}, method={method}, x2=None, diagonal")


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_recurrent_model_is_left_intact(cell):
    model = _recurrent(cell, True, 2, True)
    before = _registrations(model)
    state = copy.deepcopy(model.state_dict())
    x = _sequences(3)
    torch_ntk.empirical_ntk(model, x, method="jacobian")
    _assert_intact(model, before)
    flat = [getattr(model.rnn, name) for name in model.rnn._flat_weights_names]
    assert all(w is p for w, p in zip(model.rnn._flat_weights, flat))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# The vmap-or-autograd decision

def test_vmappable_model_keeps_the_vmap_path(monkeypatch):
    model, x, _ = make("mlp_k10", torch.float64, 9, 1)
    engine = JacobianNTK(model, checks.check_model(model))
    assert engine.vmap is None
    monkeypatch.setattr(engine.jacobian, "_autograd", _forbidden)
    for block in (x[:4], x[4:8], x[8:]):
        engine.factors(block)
    assert engine.vmap is True and engine.jacobian.vmap_error is None
    with torch_ntk.empirical.api.KernelPlan(model, x, method="jacobian", batch_size=4) as plan:
        for i, j in plan.tiles():
            plan.compute_tile(i, j)
        assert plan.engine.name == "jacobian" and plan.engine.vmap is True


def test_recurrent_model_decides_once_per_model():
    model = _recurrent("gru", True, 1, False)
    engine = JacobianNTK(model, checks.check_model(model))
    calls = _count_calls(engine.jacobian, "_vmap_raw")
    x = _sequences(7)
    j = torch.cat([engine.jacobian(x[i:i + 3]) for i in range(0, 7, 3)])
    assert calls == [1], "vmap was tried again after it failed"
    assert engine.vmap is False and "Error" in engine.jacobian.vmap_error
    assert_close(j, autograd_jacobian(model, x), torch.float64, "autograd path, 3 blocks")
    again = JacobianNTK(model, checks.check_model(model))
    assert again.vmap is False
    again_calls = _count_calls(again.jacobian, "_vmap_raw")
    again.factors(x[:2])
    assert again_calls == [0]
    assert JacobianNTK(_recurrent("gru", True, 1, False), {}).vmap is None  # another model


@pytest.mark.parametrize("batched", [True, False])
def test_autograd_path_matches_vmap_path(batched):
    model, x, _ = make("mlp_k10", torch.float64, 12, 1)
    params = checks.check_model(model)
    want = PerSampleJacobian(model, params)(x)
    forced = PerSampleJacobian(model, params)
    forced.vmap = False
    forced._batched_grads = None if batched else False
    got = forced(x)  # chunks of 1, 3, 3, 3, 2 samples (K = 10)
    assert forced._batched_grads is batched
    assert_close(got, want, torch.float64, f"autograd path, batched={batched}")
    assert_close(got, autograd_jacobian(model, x), torch.float64, "autograd vs reference")


class _Unused(nn.Module):
    """The only trainable parameter is not used: the output has no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).requires_grad_(False)
        self.spare = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("vmap", [True, False])
def test_output_independent_of_the_parameters_has_zero_jacobian(vmap):
    model = _Unused().double()
    engine = PerSampleJacobian(model, checks.check_model(model))
    engine.vmap = vmap
    got = engine(torch.randn(5, 3, dtype=torch.float64))
    assert torch.equal(got, torch.zeros(5, 2, 4, dtype=torch.float64))


# Genuine errors are not masked by the fallback

def test_nan_output_of_a_recurrent_model_is_the_usual_error():
    model = _recurrent("lstm", True, 1, False)
    with torch.no_grad():
        model.head.bias[0] = float("nan")
    engine = JacobianNTK(model, checks.check_model(model))
    with pytest.raises(ValueError, match="not finite"):
        engine.factors(_sequences(3))
    assert engine.vmap is None, "a model error was taken for a vmap limitation"
    assert JacobianNTK(model, {}).vmap is None
    with pytest.raises(ValueError, match="not finite"):
        torch_ntk.empirical_ntk(model, _sequences(3), method="jacobian")


def test_wrong_input_shape_of_a_recurrent_model_is_the_models_own_error():
    model = _recurrent("gru", True, 1, False)
    bad = torch.randn(3, 4, 5, dtype=torch.float64)
    with pytest.raises(RuntimeError) as direct:
        model(bad[:1])
    engine = JacobianNTK(model, checks.check_model(model))
    with pytest.raises(RuntimeError) as raised:
        engine.factors(bad)
    assert str(raised.value) == str(direct.value)
    assert raised.value.__context__ is None, "the error is chained to vmap's failure"
    assert engine.vmap is None


# The model is left intact: modules registered twice, weights tied between modules

class _TwoNames(nn.Module):
    """One Linear registered as ``a`` and ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = self.a
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class _TiedAcrossModules(nn.Module):
    """Two Linear modules sharing one weight Parameter, each with its own bias."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.sin(self.a(x)))))


def _reused_in_sequential() -> nn.Module:
    lin = nn.Linear(3, 3)
    return nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(3, 2))


SHARED = {"two_names": _TwoNames, "tied_across_modules": _TiedAcrossModules,
          "reused_in_sequential": _reused_in_sequential}


@pytest.mark.parametrize("name", sorted(SHARED))
def test_per_sample_jacobian_keeps_shared_parameters(name):
    model = SHARED[name]().double()
    before = _registrations(model)
    x = torch.randn(5, 3, dtype=torch.float64)
    got = jacobian.per_sample_jacobian(model, checks.check_model(model), x)
    _assert_intact(model, before)
    copy.deepcopy(model)
    assert_close(got, autograd_jacobian(model, x), torch.float64, f"Jacobian of {name}")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_parameters_are_left_intact_and_exact(name, method):
    model = SHARED[name]().double()
    twin = copy.deepcopy(model)
    before = _registrations(model)
    x1, x2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    got = torch_ntk.empirical_ntk(model, x1, x2, method=method, batch_size=3)
    _assert_intact(model, before)
    assert_close(got, autograd_ntk(model, x1, x2), torch.float64, f"{name}, {method}")
    copy.deepcopy(model)
    model(x1).sum().backward()
    twin(x1).sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        assert p.grad is not None and torch.equal(p.grad, q.grad), n


# Model outputs without gradients

class _Cast(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        y = self.lin(x)
        if self.kind == "int":
            return (10 * y).long()
        if self.kind == "bool":
            return y > 0
        return torch.complex(y, -y)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind,dtype", [("int", "int64"), ("bool", "bool"),
                                        ("complex", "complex128")])
def test_non_floating_output_is_a_clear_type_error(kind, dtype, method):
    model = _Cast(kind).double()
    with pytest.raises(TypeError, match=rf"output .*floating-point.*got dtype torch\.{dtype}"):
        torch_ntk.empirical_ntk(model, torch.randn(3, 3, dtype=torch.float64), method=method)


# Concurrent calls on one model

@pytest.mark.parametrize("name", ["mlp_k10", "gru_bidirectional"])
def test_concurrent_calls_on_one_model_match_sequential_calls(name):
    model, x1, x2 = make(name, torch.float64, 6, 5)
    before = _registrations(model)
    jobs = [(method, other, mode) for method in ("jacobian", "structured")
            for other, mode in ((None, "full"), (x2, "trace"), (x2, "full"), (None, "diagonal"),
                                (x2, "diagonal"))]
    assert len(jobs) == 10

    def run(job):
        method, other, mode = job
        return torch_ntk.empirical_ntk(model, x1, other, mode=mode, method=method, batch_size=4)

    sequential = [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(run, jobs))
    for job, a, b in zip(jobs, sequential, concurrent):
        assert torch.equal(a, b), f"{job[0]}, mode={job[2]} differs when run concurrently"
    _assert_intact(model, before)


# Internal helpers

def _forbidden(*args, **kwargs):
    raise AssertionError("the autograd path ran on a model vmap can run")


def _count_calls(obj: object, attr: str) -> list[int]:
    """Wraps ``obj.attr`` to count its calls; returns the one-element counter."""
    calls = [0]
    inner = getattr(obj, attr)

    def counted(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    setattr(obj, attr, counted)
    return calls
