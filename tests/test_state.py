"""state.ModelState and the call switches: a call leaves the model and the process as it found
them, also when calls overlap on several threads; checks.check_out refuses outputs that alias."""
from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import torch_ntk
from conftest import assert_close, autograd_ntk
from torch_ntk.empirical import checks, state

F64 = torch.float64


class Wrapper(nn.Module):
    """A head of its own on a backbone that other wrappers share."""

    def __init__(self, backbone: nn.Module, k: int) -> None:
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(8, k)

    def forward(self, x):
        return self.head(self.backbone(x))


def _in_threads(work, count: int) -> list[str]:
    """Runs ``work(i)`` on ``count`` threads started together; returns their errors."""
    barrier, errors = threading.Barrier(count), []

    def run(i):
        try:
            barrier.wait()
            work(i)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(f"thread {i}: {type(exc).__name__}: {exc}"[:300])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a call deadlocked"
    return errors


def test_wrappers_sharing_a_backbone_are_exact_on_concurrent_threads():
    backbone = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh()).double()
    models = [Wrapper(backbone, k).double() for k in (1, 2, 3, 4)]
    x = torch.randn(7, 3, dtype=F64)
    refs = [autograd_ntk(m, x, x) for m in models]

    def work(i):
        for _ in range(4):
            for method in ("auto", "jacobian"):
                got = torch_ntk.empirical_ntk(models[i], x, method=method)
                assert_close(got, refs[i], F64, f"wrapper {i} {method}")

    assert _in_threads(work, 4) == []


def test_shared_parts_are_locked_and_the_lock_is_reentrant():
    backbone = nn.Linear(3, 8)
    outer, other = Wrapper(backbone, 2), Wrapper(backbone, 3)
    held = state.ModelState(outer)
    nested = state.ModelState(other)      # same thread: re-enters what it holds
    entered = threading.Event()

    def blocked():
        s = state.ModelState(nn.Sequential(backbone))
        entered.set()
        s.restore()

    thread = threading.Thread(target=blocked)
    thread.start()
    assert not entered.wait(0.2), "another thread took a backbone held by this one"
    nested.restore()
    assert not entered.wait(0.2), "released while the outer call still holds the backbone"
    held.restore()
    assert entered.wait(10)
    thread.join()
    free = state.ModelState(nn.Linear(2, 2))  # disjoint models never wait
    free.restore()


def _flags():
    cuda = torch.backends.cuda
    return (cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, cuda.flash_sdp_enabled(),
            cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled(), cuda.cudnn_sdp_enabled(),
            torch.backends.mha.get_fastpath_enabled())


@pytest.fixture
def user_flags():
    """The user's switches, all on (TF32 allowed), put back as they were afterwards."""
    saved = _flags()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield _flags()
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.backends.mha.set_fastpath_enabled(saved[-1])


@pytest.mark.parametrize("switch", [state.exact_matmul, state.no_autocast])
def test_overlapping_switches_restore_the_user_settings(user_flags, switch):
    """A enters, B enters, A leaves, B leaves: the settings are ours until B leaves."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    inside = []

    def first(_):
        with switch():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def second(_):
        a_in.wait(10)
        with switch():
            b_in.set()
            a_out.wait(10)
            inside.append(_flags())

    assert _in_threads(lambda i: (first, second)[i](i), 2) == []
    assert _flags() == user_flags
    tf32, attention = inside[0][:2], inside[0][2:]
    if switch is state.exact_matmul:
        assert tf32 == (False, False), "TF32 came back while the second block ran"
    else:
        assert attention == (False, False, True, False, False), "attention switches came back"


def test_concurrent_calls_leave_the_process_flags(user_flags):
    models = [nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
              for _ in range(4)]
    x = torch.randn(5, 3, dtype=F64)

    def work(i):
        for _ in range(5):
            torch_ntk.empirical_ntk(models[i], x)

    assert _in_threads(work, 4) == []
    assert _flags() == user_flags


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"),
                    reason="torch without the fp32_precision API")
@pytest.mark.parametrize("setting", ["new_api", "medium"])
def test_tf32_settings_of_either_api_come_back_exactly(setting):
    leaves = [torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn]
    saved = [leaf.fp32_precision for leaf in leaves]
    try:
        if setting == "new_api":  # the legacy allow_tf32 reads raise from here on
            torch.backends.cuda.matmul.fp32_precision = "tf32"
        else:
            torch.set_float32_matmul_precision("medium")
        before = [leaf.fp32_precision for leaf in leaves]
        with state.exact_matmul():
            assert not torch._C._get_cublas_allow_tf32()
        model = nn.Linear(3, 2).double()
        torch_ntk.empirical_ntk(model, torch.randn(4, 3, dtype=F64))
        assert [leaf.fp32_precision for leaf in leaves] == before
        if setting == "medium":
            assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision("highest")
        for leaf, precision in zip(leaves, saved):
            leaf.fp32_precision = precision
    assert [leaf.fp32_precision for leaf in leaves] == saved


class PaddedEncoder(nn.Module):
    """A TransformerEncoder in eval mode with a padding mask: its fast path makes nested tensors."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        mask = torch.zeros(x.shape[:2], dtype=torch.bool)
        mask[:, -1] = True
        return self.head(self.encoder(x, src_key_padding_mask=mask).mean(1))


def test_transformer_fast_path_is_off_during_a_call(user_flags):
    model = PaddedEncoder().double().eval()
    x = torch.randn(3, 4, 8, dtype=F64)
    got = torch_ntk.empirical_ntk(model, x)
    assert_close(got, autograd_ntk(model, x, x), F64, "padded encoder")
    assert torch.backends.mha.get_fastpath_enabled()


def test_parameters_changed_in_place_by_the_forward_are_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Flatten(), nn.Linear(12, 2),
                          nn.Linear(2, 2)).double()
    with torch.no_grad():
        model[0].weight.mul_(3.0)          # every row longer than max_norm
    model[3].weight.requires_grad_(False)  # a frozen parameter
    model(torch.arange(6).reshape(2, 3)).sum().backward()  # gradients to leave alone
    with torch.no_grad():
        model[0].weight.mul_(3.0)          # the backward's forward renormalised some rows
    x = torch.randint(0, 10, (5, 3))
    reference = copy.deepcopy(model)
    expected = autograd_ntk(reference, x, x)  # at the renormalised rows, as in the forward
    params = list(model.parameters())
    values = [p.detach().clone() for p in params]
    versions = [p._version for p in params]
    grads = [(p.grad, None if p.grad is None else p.grad.clone()) for p in params]
    for method in ("auto", "jacobian"):
        got = torch_ntk.empirical_ntk(model, x, method=method)
        assert_close(got, expected, F64, method)
        for p, value, (grad, grad_value) in zip(params, values, grads):
            assert torch.equal(p, value), "a parameter changed in place was not restored"
            assert p.grad is grad and (grad is None or torch.equal(p.grad, grad_value))
    assert [p._version for p in params[1:]] == versions[1:], "untouched parameters were written"


def test_registered_tensors_and_flags_of_a_scripted_model_are_restored():
    model = torch.jit.script(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    linear = list(model.modules())[1]
    weight, bias = linear.weight, linear.bias
    saved = state.ModelState(model)
    linear.weight = nn.Parameter(torch.zeros(4, 3))
    with torch.no_grad():
        bias.add_(1.0)
    model.eval()
    saved.restore()
    assert linear.weight is weight and model.training and linear.training
    assert torch.equal(bias, saved.values[1][1])


def test_scripted_model_is_exact_and_refused_by_structured():
    model = torch.jit.script(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))).double()
    x1, x2 = torch.randn(5, 3, dtype=F64), torch.randn(3, 3, dtype=F64)
    expected = autograd_ntk(model, x1, x2)
    for method in ("auto", "jacobian"):
        assert_close(torch_ntk.empirical_ntk(model, x1, x2, method=method), expected, F64,
                     f"scripted {method}")
    with pytest.raises(ValueError, match="TorchScript"):
        torch_ntk.empirical_ntk(model, x1, x2, method="structured")


def test_out_overlapping_through_any_strides_is_refused():
    model = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=F64)
    base = torch.zeros(64, dtype=F64)
    with pytest.raises(ValueError, match="overlapping memory"):   # element (1, 0) is (0, 2)
        torch_ntk.empirical_ntk(model, x, mode="trace", out=base.as_strided((4, 4), (2, 1)))
    interleaved = base.as_strided((4, 4), (2, 5))  # offsets 2i + 5j: distinct, yet interleaved
    got = torch_ntk.empirical_ntk(model, x, mode="trace", out=interleaved)
    assert got is interleaved
    assert_close(got, torch_ntk.empirical_ntk(model, x, mode="trace", method="jacobian"), F64,
                 "interleaved out")


def test_out_on_the_meta_device_is_refused():
    with pytest.raises(ValueError, match="meta tensor, which has no data"):
        torch_ntk.empirical_ntk(nn.Linear(3, 2).double(), torch.randn(4, 3, dtype=F64),
                                mode="trace", out=torch.empty(4, 4, dtype=F64, device="meta"))


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.frozen = nn.Parameter(torch.zeros(40), requires_grad=False)
        self.register_buffer("table", torch.zeros(40))

    def forward(self, x):
        return self.lin(x) * (1 + self.table[:2]) + self.frozen[:2]


@pytest.mark.parametrize("alias", ["frozen", "table", "grad"])
def test_out_sharing_memory_with_the_model_is_refused(alias):
    model = Scaled().double()
    model.lin.weight.grad = torch.zeros(64, dtype=F64)[:6].view(2, 3)
    storage = {"frozen": model.frozen, "table": model.table,
               "grad": model.lin.weight.grad.untyped_storage()}[alias]
    if isinstance(storage, torch.Tensor):
        out = storage[4:20].view(4, 4)
    else:
        out = torch.empty(0, dtype=F64).set_(storage, 2, (4, 4), (4, 1))
    kind = {"frozen": "parameter 'frozen'", "table": "buffer 'table'",
            "grad": "gradient of 'lin.weight'"}[alias]
    with pytest.raises(ValueError, match=f"shares memory with the model's {kind}"):
        checks.check_out(out, (4, 4), F64, inputs=(torch.randn(4, 3, dtype=F64), None),
                         model=model)
    checks.check_out(torch.empty(4, 4, dtype=F64), (4, 4), F64, model=model)


def test_threads_capped_while_other_processes_compute(monkeypatch):
    """With every other CPU busy a call runs on one intra-op thread, then restores the count;
    an idle machine keeps the user's count."""
    from torch_ntk.empirical import state

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    before = torch.get_num_threads()
    seen = []
    handle = model[0].register_forward_hook(lambda *a: seen.append(torch.get_num_threads()))
    try:
        monkeypatch.setattr(state, "_busy_elsewhere", lambda: state._cpus())
        torch_ntk.empirical_ntk(model, x)
        assert set(seen) == {1} and torch.get_num_threads() == before
        with pytest.raises(ValueError):
            torch_ntk.empirical_ntk(model, x, mode="nope")
        with pytest.raises(RuntimeError):     # the model's own error, from the probe
            torch_ntk.empirical_ntk(model, torch.randn(5, 4))
        assert torch.get_num_threads() == before
        seen.clear()
        monkeypatch.setattr(state, "_busy_elsewhere", lambda: 0)
        torch_ntk.empirical_ntk(model, x)
        assert set(seen) == {before}
    finally:
        handle.remove()


def test_busy_elsewhere_reads_proc():
    from torch_ntk.empirical import state

    busy = state._busy_elsewhere()
    assert isinstance(busy, int) and 0 <= busy
