"""What happens on one sample the probe never sees: each block of x1 and x2 is checked, so a
rare data-dependent path gives the exact kernel (auto, jacobian) or a ValueError that names the
layer and the sample (structured), never a wrong number."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_ntk
from conftest import assert_close, autograd_ntk

F64 = torch.float64


def _inputs(n: int, rare: list[int], features: int = 4) -> torch.Tensor:
    """n samples whose first feature is below 1, except at ``rare`` (3.0 there)."""
    x = torch.randn(n, features, dtype=F64)
    x[:, 0] = x[:, 0].clamp(-1, 1)
    x[rare, 0] = 3.0
    return x


def _reference(model, x1, x2=None):
    return autograd_ntk(model, x1, x1 if x2 is None else x2)


def _exact_or_named(model, x1, x2, culprit: str | None, sample: str, **kw):
    """auto and jacobian exact against per-sample autograd; structured refuses, naming the
    layer (when given) and the sample."""
    ref = _reference(model, x1, x2)
    for method in ("auto", "jacobian"):
        got = torch_ntk.empirical_ntk(model, x1, x2, method=method, **kw)
        assert_close(got, ref, F64, method)
    if culprit is not None:
        with pytest.raises(ValueError, match=rf"{sample}.*{culprit}|{culprit}.*{sample}"):
            torch_ntk.empirical_ntk(model, x1, x2, method="structured", **kw)


class RareReuse(nn.Module):
    """The head's weight also acts through F.linear on samples whose first feature is rare."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(4, 6), nn.Linear(6, 6)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        gate = (x[:, :1] > 2.5).to(x.dtype)
        return self.head(h) + gate * F.linear(h, self.head.weight)


@pytest.mark.parametrize("batch_size", [None, 5])
def test_rare_reuse_on_one_sample_of_x1(batch_size):
    model = RareReuse().double()
    x1 = _inputs(12, rare=[9])
    _exact_or_named(model, x1, None, "head", "sample 9 of x1", batch_size=batch_size)


def test_rare_reuse_on_the_last_sample_of_x2():
    model = RareReuse().double()
    x1, x2 = _inputs(7, rare=[]), _inputs(6, rare=[5])
    _exact_or_named(model, x1, x2, "head", "sample 5 of x2")


class RareConvReuse(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 2, 3, padding=1), nn.Linear(2 * 16, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        gate = (x[:, :1, :1, :1] > 2.5).to(x.dtype)
        h = h + gate * F.conv2d(h, self.conv.weight, padding=1)
        return self.head(h.flatten(1))


def test_rare_conv2d_reuse():
    model = RareConvReuse().double()
    x = torch.randn(8, 2, 4, 4, dtype=F64).clamp(-1, 1)
    x[6, 0, 0, 0] = 3.0
    _exact_or_named(model, x, None, "conv", "sample 6 of x1")


class BranchReuse(nn.Module):
    """A Python branch on the batch: when any sample is rare, a hidden layer is applied twice."""

    def __init__(self):
        super().__init__()
        self.a, self.mid, self.b = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        out = torch.tanh(self.mid(h))
        if bool((x[:, 0] > 2.5).any()):
            twice = torch.tanh(F.linear(out, self.mid.weight, self.mid.bias))
            out = torch.where(x[:, :1] > 2.5, twice, out)
        return self.b(out)


def test_python_branch_that_reuses_a_weight_on_a_rare_sample():
    model = BranchReuse().double()
    x1, x2 = _inputs(9, rare=[]), _inputs(5, rare=[3])
    _exact_or_named(model, x1, x2, "mid", "sample 3 of x2")


class RareReorder(nn.Module):
    """A rare feature makes the model sort the batch around its first layer."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        if bool((x[:, 0] > 2.5).any()):
            order = x[:, 1].argsort()
            h = torch.tanh(self.a(x[order]))[order.argsort()]
        else:
            h = torch.tanh(self.a(x))
        return self.b(h)


def test_batch_reordered_only_when_a_rare_sample_is_present():
    model = RareReorder().double()
    x = _inputs(10, rare=[7])
    _exact_or_named(model, x, None, "a", "of x1", batch_size=4)


def test_forward_pre_hook_on_rare_samples_is_applied_once():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    model[0].register_forward_pre_hook(
        lambda m, args: (args[0] * (1 + (args[0][:, :1] > 2.5).to(args[0].dtype)),))
    x = _inputs(8, rare=[5])
    ref = _reference(model, x)
    for method in ("auto", "structured", "jacobian"):
        assert_close(torch_ntk.empirical_ntk(model, x, method=method), ref, F64, method)


def test_forward_hook_that_reads_a_peer_weight():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5)).double()
    peer = model[2]

    def hook(module, args, out):
        gate = (args[0][:, :1] > 2.5).to(out.dtype)
        return out + gate * F.linear(out, peer.weight)

    model[0].register_forward_hook(hook)
    x = _inputs(8, rare=[6])
    _exact_or_named(model, x, None, "2", "sample 6 of x1")


class ListCache(nn.Module):
    """A weight also held in a plain Python list, which torch.func's swaps don't reach."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)
        self.cache = [self.a.weight]

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h + 0.5 * F.linear(h, self.cache[0]))


def test_weight_held_in_a_python_list():
    model = ListCache().double()
    x1, x2 = torch.randn(6, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    _exact_or_named(model, x1, x2, "a", "of x1")
    for mode in ("trace", "diagonal"):
        ref = torch_ntk.empirical_ntk(model, x1, x2, method="jacobian")
        got = torch_ntk.empirical_ntk(model, x1, x2, mode=mode)
        want = ref.diagonal(dim1=2, dim2=3)
        assert_close(got, want.sum(-1) if mode == "trace" else want, F64, mode)


class RareMean(nn.Module):
    """Samples interact only through one rare sample: it adds the batch mean to itself."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x)
        return h + (x[:, :1] > 2.5).to(x.dtype) * h.mean(0)


@pytest.mark.parametrize("method", ["auto", "structured", "jacobian"])
def test_interaction_through_a_rare_sample_is_refused(method):
    x = _inputs(12, rare=[10])
    with pytest.raises(ValueError, match="sample 10 of x1 changed when the samples beside it"):
        torch_ntk.empirical_ntk(RareMean().double(), x, method=method)


class DetachedRareScale(nn.Module):
    """One rare sample scales every output by a detached batch sum: the same in any order of
    the batch, so only a batch without the rare sample shows it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x)
        gate = (x[:, :1] > 2.5).to(x.dtype)
        return h * (1 + (gate * h).sum(0).detach())


@pytest.mark.parametrize("method", ["auto", "structured", "jacobian"])
def test_a_detached_statistic_of_a_rare_sample_is_refused(method):
    x = _inputs(12, rare=[10])
    with pytest.raises(ValueError, match="changed when the samples beside it"):
        torch_ntk.empirical_ntk(DetachedRareScale().double(), x, method=method)


class GradientOnlyMix(nn.Module):
    """Outputs per sample, but gradients mixed across the batch (a detached mean trick)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x)
        return h + h.mean(0) - h.mean(0).detach()


@pytest.mark.parametrize("method", ["auto", "structured", "jacobian"])
def test_samples_that_interact_only_through_gradients_are_refused(method):
    with pytest.raises(ValueError):
        torch_ntk.empirical_ntk(GradientOnlyMix().double(), torch.randn(6, 4, dtype=F64),
                                method=method)


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


def test_factors_beyond_float32_whose_kernel_fits():
    """A layer with inputs near 1e20 and output gradients near 1e-20: its Grams overflow and
    underflow float32, its share of the kernel doesn't."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8), Scale(1e-20), nn.Tanh(),
                          nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight.mul_(1e20)
        model[0].bias.mul_(1e20)
    x = torch.randn(5, 4)
    ref = _reference(model.double(), x.double())
    model.float()
    for method in ("auto", "structured", "jacobian"):
        got = torch_ntk.empirical_ntk(model, x, method=method)
        assert torch.isfinite(got).all(), method
        assert_close(got.double(), ref, torch.float32, method)


def test_half_precision_factors_that_overflow():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 4), nn.Tanh(), nn.Linear(4, 2))
    x = 70 + torch.rand(4, 16)
    ref = _reference(model.double(), x.double())
    got = torch_ntk.empirical_ntk(model.half(), x.half(), method="structured")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


def test_a_kernel_beyond_the_dtype_is_refused():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    with torch.no_grad():
        model[0].weight.mul_(1e21)
    with pytest.raises(ValueError, match="not finite in torch.float32"):
        torch_ntk.empirical_ntk(model, torch.randn(3, 4))


class Routed(nn.Module):
    """Top-1 routing by a Python loop over samples: vmap can't run it, and an expert may get
    no sample of a chunk."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(4, 3)
        self.experts = nn.ModuleList(nn.Linear(4, 2) for _ in range(3))

    def forward(self, x):
        choice = self.gate(x).argmax(1)
        rows = [self.experts[int(c.item())](x[i:i + 1]) for i, c in enumerate(choice)]
        return torch.cat(rows) * torch.softmax(self.gate(x), 1)[:, :1]


def test_routing_with_item_and_unused_experts():
    torch.manual_seed(1)
    model = Routed().double()
    x1, x2 = torch.randn(9, 4, dtype=F64), torch.randn(4, 4, dtype=F64)
    ref = _reference(model, x1, x2)
    for method in ("auto", "jacobian"):
        assert_close(torch_ntk.empirical_ntk(model, x1, x2, method=method), ref, F64, method)


def test_outputs_of_size_zero_are_refused():
    class Empty(nn.Linear):
        def forward(self, x):
            return super().forward(x)[:, :0]

    with pytest.raises(ValueError, match="no outputs"):
        torch_ntk.empirical_ntk(Empty(3, 2).double(), torch.randn(4, 3, dtype=F64))


def test_lazy_modules_are_refused_before_anything_is_materialised():
    model = nn.Sequential(nn.LazyLinear(3), nn.Tanh(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match="uninitialised"):
        torch_ntk.empirical_ntk(model, torch.randn(4, 5))
    assert isinstance(model[0], nn.LazyLinear) and model[0].has_uninitialized_params()


class Grows(nn.Module):
    """A block holding a rare sample calls a layer twice; the others call it once."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        rare = x[:, :1] > 2.5
        if bool(rare.any()):  # only then a second call, whose result only rare samples keep
            h = torch.where(rare, torch.tanh(self.a(h)), h)
        return self.b(h)


def test_auto_takes_the_jacobian_when_the_structure_changes_with_the_input():
    model = Grows().double()
    x1 = _inputs(10, rare=[8])
    ref = _reference(model, x1)
    assert_close(torch_ntk.empirical_ntk(model, x1, batch_size=4), ref, F64, "auto")
    with pytest.raises(ValueError, match="structure depends on its input"):
        torch_ntk.empirical_ntk(model, x1, method="structured", batch_size=4)


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.reentrant = reentrant
        self.stem, self.a, self.b, self.c = (nn.Linear(4, 4), nn.Linear(4, 5), nn.Linear(5, 5),
                                             nn.Linear(5, 2))

    def block(self, h):
        return torch.tanh(self.b(torch.tanh(self.a(h))))

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(self.block, self.stem(x),
                                              use_reentrant=self.reentrant)
        return self.c(h)


def test_non_reentrant_checkpoint():
    model = Checkpointed(False).double()
    x1, x2 = torch.randn(5, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    ref = _reference(model, x1, x2)
    for method in ("auto", "structured", "jacobian"):
        assert_close(torch_ntk.empirical_ntk(model, x1, x2, method=method), ref, F64, method)


@pytest.mark.parametrize("method", ["auto", "structured", "jacobian"])
def test_reentrant_checkpoint_is_named(method):
    with pytest.raises(ValueError, match="use_reentrant=False"):
        torch_ntk.empirical_ntk(Checkpointed(True).double(), torch.randn(5, 4, dtype=F64),
                                method=method)


def test_constant_integer_rows_of_a_batch_mixing_model_are_refused():
    class Mixing(nn.Module):
        def __init__(self):
            super().__init__()
            self.e, self.head = nn.Embedding(6, 3), nn.Linear(3, 2)

        def forward(self, t):
            h = self.e(t).mean(1)
            return self.head(h + h.mean(0))

    with pytest.raises(ValueError, match="depends on the other samples"):
        torch_ntk.empirical_ntk(Mixing().double(), torch.full((4, 5), 3))


class GrowingBuffer(nn.Module):
    """Reassigns a buffer on every forward (under torch.func.vmap too)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("seen", torch.zeros(0, dtype=F64))

    def forward(self, x):
        self.seen = torch.cat([self.seen, x[:, 0]])
        return self.lin(x)


@pytest.mark.parametrize("batch_size", [None, 2])
def test_a_forward_that_reassigns_a_growing_buffer(batch_size):
    model = GrowingBuffer().double()
    x1, x2 = torch.randn(5, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    ref = _reference(model, x1, x2)
    model.seen = torch.zeros(0, dtype=F64)
    for method in ("auto", "structured", "jacobian"):
        got = torch_ntk.empirical_ntk(model, x1, x2, method=method, batch_size=batch_size)
        assert_close(got, ref, F64, method)
        assert model.seen.shape == (0,), method


class GradModeReuse(nn.Module):
    """Reuses a weight on rare samples only while grad mode is on (as training code may)."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(4, 6), nn.Linear(6, 6)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        out = self.head(h)
        if torch.is_grad_enabled():
            out = out + (x[:, :1] > 2.5).to(x.dtype) * F.linear(h, self.head.weight)
        return out


def test_a_rare_reuse_that_only_runs_with_grad_mode_on():
    model = GradModeReuse().double()
    x = _inputs(9, rare=[4])
    _exact_or_named(model, x, None, "head", "sample 4 of x1")


class NoGradNorm(nn.Module):
    """Divides by a weight's norm taken under no_grad inside the forward (a constant to
    autograd, so to the NTK too)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        with torch.no_grad():
            scale = self.a.weight.norm()
        return self.b(h / scale)


class StraightThrough(torch.autograd.Function):
    """Rounds forward, passes the gradient through backward (no forward-mode formula)."""

    @staticmethod
    def forward(ctx, x):
        return x.round()

    @staticmethod
    def backward(ctx, grad):
        return grad


class Quantised(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(StraightThrough.apply(4 * torch.tanh(self.a(x))))


@pytest.mark.parametrize("cls", [NoGradNorm, Quantised])
def test_what_autograd_treats_as_constant_or_straight_through(cls):
    model = cls().double()
    x1, x2 = torch.randn(6, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    ref = _reference(model, x1, x2)
    for method in ("auto", "structured", "jacobian"):
        assert_close(torch_ntk.empirical_ntk(model, x1, x2, method=method), ref, F64, method)


class Float32Norm(nn.Module):
    """An RMSNorm that computes in float32 inside a float64 model (as Hugging Face's do)."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(x.dtype)


def test_float64_model_that_computes_in_float32_inside():
    model = nn.Sequential(nn.Linear(4, 6), Float32Norm(6), nn.Tanh(), nn.Linear(6, 2)).double()
    x1, x2 = torch.randn(7, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    ref = _reference(model, x1, x2)
    for method in ("auto", "structured", "jacobian"):
        got = torch_ntk.empirical_ntk(model, x1, x2, method=method)
        assert_close(got, ref, torch.float32, method)


class Cube(torch.autograd.Function):
    """x³ with a correct backward and no forward-mode formula."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 3

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 3 * x ** 2


class UnusedAndCubed(nn.Module):
    """A root parameter the forward never uses, and a Function without jvp."""

    def __init__(self):
        super().__init__()
        self.l, self.o = nn.Linear(4, 5), nn.Linear(5, 3)
        self.unused = nn.Parameter(torch.randn(5, 5))

    def forward(self, x):
        return self.o(Cube.apply(self.l(x)))


class RootParameterOnRareSamples(nn.Module):
    """A bare root parameter that only rare samples use."""

    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 3)
        self.extra = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        out = self.l(x)
        rare = x[:, 0] > 2.5
        if bool(rare.any()):
            out = out.clone()
            out[rare] = out[rare] + x[rare] @ self.extra.T
        return out


@pytest.mark.parametrize("cls", [UnusedAndCubed, RootParameterOnRareSamples])
@pytest.mark.parametrize("rare_side", ["x1", "x2"])
def test_parameters_unused_on_some_or_all_samples(cls, rare_side):
    model = cls().double()
    x1 = _inputs(6, rare=[2] if rare_side == "x1" else [])
    x2 = _inputs(4, rare=[3] if rare_side == "x2" else [])
    ref = _reference(model, x1, x2)
    for method in ("auto", "structured", "jacobian"):
        for mode in ("full", "trace"):
            got = torch_ntk.empirical_ntk(model, x1, x2, method=method, mode=mode)
            want = ref if mode == "full" else ref.diagonal(dim1=2, dim2=3).sum(-1)
            assert_close(got, want, F64, f"{method} {mode}")


class CheckpointedData(nn.Module):
    """A reentrant checkpoint straight on the data: autograd gives its layers no gradient."""

    def __init__(self):
        super().__init__()
        self.a, self.c = nn.Linear(4, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = torch.utils.checkpoint.checkpoint(lambda t: torch.tanh(self.a(t)), x,
                                              use_reentrant=True)
        return self.c(h)


@pytest.mark.parametrize("method", ["auto", "structured", "jacobian"])
def test_reentrant_checkpoint_on_data_is_refused(method):
    with pytest.raises(ValueError, match="inputs that don't require grad"):
        torch_ntk.empirical_ntk(CheckpointedData().double(), torch.randn(5, 4, dtype=F64),
                                method=method)


class SineWrongJvp(torch.autograd.Function):
    """sin with the right backward and a wrong forward-mode formula."""

    @staticmethod
    def forward(x):
        return torch.sin(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.cos(x)

    @staticmethod
    def jvp(ctx, tangent):
        return 2 * tangent


def test_a_function_whose_jvp_is_wrong_gets_reverse_modes_kernel():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.b(SineWrongJvp.apply(self.a(x)))

    model = Model().double()
    x1, x2 = torch.randn(7, 4, dtype=F64), torch.randn(2, 4, dtype=F64)
    _exact_or_named(model, x1, x2, None, "")


class SquareOnce(torch.autograd.Function):
    """x² whose backward can't itself be differentiated, and no forward-mode formula."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


def test_a_once_differentiable_function_is_computed_by_autograd():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(SquareOnce.apply(self.a(x)))

    model = Model().double()
    x1, x2 = torch.randn(5, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    ref = _reference(model, x1, x2)
    for method in ("auto", "jacobian"):
        assert_close(torch_ntk.empirical_ntk(model, x1, x2, method=method), ref, F64, method)
    with pytest.raises(ValueError, match="can't check its factors"):
        torch_ntk.empirical_ntk(model, x1, x2, method="structured")


def test_gradient_hooks_on_parameters_are_refused():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    handle = model[0].weight.register_hook(lambda g: 0.5 * g)
    with pytest.raises(ValueError, match=r"0\.weight have gradient hooks"):
        torch_ntk.empirical_ntk(model, torch.randn(4, 4, dtype=F64))
    handle.remove()
    torch_ntk.empirical_ntk(model, torch.randn(4, 4, dtype=F64))


def test_a_forward_that_stops_tracking_a_parameter_is_named():
    class Freezes(nn.Module):
        def __init__(self, freeze: bool):
            super().__init__()
            self.freeze = freeze
            self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 2)

        def forward(self, x):
            if self.freeze:
                self.b.weight.requires_grad_(False)
            return self.b(torch.tanh(self.a(x)))

    model, twin = Freezes(True).double(), Freezes(False).double()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(4, 4, dtype=F64)
    ref = _reference(twin, x)   # the NTK over the parameters trainable at the call
    for method in ("auto", "structured", "jacobian"):
        try:
            got = torch_ntk.empirical_ntk(model, x, method=method)
        except ValueError as exc:
            assert "stopped requiring grad" in str(exc), exc
        else:
            assert_close(got, ref, F64, method)
        assert model.b.weight.requires_grad, method
