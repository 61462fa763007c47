"""monte_carlo_ntk: the mean and standard error of empirical_ntk over freshly built models, its
seeding, its convergence to analytic_ntk, networks without a closed form, and its errors."""
from __future__ import annotations

import math
import weakref

import pytest
import torch
from torch import nn

import torch_ntk

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a small, shared CPU machine the many tiny float64 convolutions
    of these tests wait on each thread pool wake-up (about 30 ms each with 2 threads under load,
    about 50 µs with one); the results don't depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_mlp(k: int = 2, dtype=F64) -> nn.Module:
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, k)).to(dtype)


def by_hand(make_model, x1, x2, n, seed, mode, **kwargs):
    """The kernels of the models ``torch.manual_seed(seed)`` and n calls of make_model give."""
    torch.manual_seed(seed)
    models = [make_model() for _ in range(n)]
    return torch.stack([torch_ntk.empirical_ntk(m, x1, x2, mode=mode, **kwargs) for m in models])


def assert_tight(actual, expected, tol=1e-12):
    scale = max(float(expected.abs().max()), 1.0)
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol * scale)


class Counter:
    """make_model that counts its calls and checks that earlier models are gone."""

    def __init__(self, build=small_mlp) -> None:
        self.build, self.calls, self.alive_at_call = build, 0, []
        self.refs: list = []

    def __call__(self) -> nn.Module:
        self.alive_at_call.append(sum(r() is not None for r in self.refs))
        self.calls += 1
        model = self.build()
        self.refs.append(weakref.ref(model))
        return model


# Mean and standard error

@pytest.mark.parametrize("mode", ["trace", "full", "diagonal"])
@pytest.mark.parametrize("distinct_x2", [False, True], ids=["x2=None", "x2"])
def test_mean_and_stderr_equal_the_models_built_by_hand(mode, distinct_x2):
    x1 = torch.randn(4, 3, dtype=F64)
    x2 = torch.randn(3, 3, dtype=F64) if distinct_x2 else None
    n, seed = 5, 3
    result = torch_ntk.monte_carlo_ntk(small_mlp, x1, x2, n_samples=n, mode=mode, seed=seed)
    ks = by_hand(small_mlp, x1, x2, n, seed, mode)
    assert isinstance(result, torch_ntk.infinite.monte_carlo.MonteCarloNTK)
    mean, stderr = result
    assert mean.shape == stderr.shape == ks.shape[1:]
    assert mean.dtype == stderr.dtype == F64
    assert_tight(mean, ks.mean(0))
    assert_tight(stderr, ks.std(0, correction=1) / math.sqrt(n))
    assert bool((stderr > 0).all())


def test_float32_models_give_float32_accumulated_in_float64():
    x = torch.randn(4, 3)
    make = lambda: small_mlp(dtype=torch.float32)  # noqa: E731
    result = torch_ntk.monte_carlo_ntk(make, x, n_samples=6, mode="diagonal", seed=1)
    ks = by_hand(make, x, None, 6, 1, "diagonal").double()
    assert result.mean.dtype == result.stderr.dtype == torch.float32
    torch.testing.assert_close(result.mean, ks.mean(0).float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(result.stderr, (ks.std(0) / math.sqrt(6)).float(),
                               rtol=1e-5, atol=1e-7)


def test_method_and_batch_size_are_passed_to_empirical_ntk():
    x = torch.randn(5, 3, dtype=F64)
    ref = torch_ntk.monte_carlo_ntk(small_mlp, x, n_samples=3, mode="full")
    other = torch_ntk.monte_carlo_ntk(small_mlp, x, n_samples=3, mode="full",
                                      method="jacobian", batch_size=2)
    assert_tight(other.mean, ref.mean, 1e-10)
    assert_tight(other.stderr, ref.stderr, 1e-10)
    with pytest.raises(ValueError, match="method"):
        torch_ntk.monte_carlo_ntk(small_mlp, x, n_samples=3, method="bogus")
    with pytest.raises(ValueError, match="batch_size"):
        torch_ntk.monte_carlo_ntk(small_mlp, x, n_samples=3, batch_size=0)


# Seeding

def test_global_rng_state_is_left_alone_and_ignored():
    x = torch.randn(4, 3, dtype=F64)
    tracker = getattr(torch.cuda, "_lazy_seed_tracker", None)
    queued = None if tracker is None else [c and c[0] for c in tracker.get_calls()]
    state = torch.get_rng_state()
    first = torch_ntk.monte_carlo_ntk(small_mlp, x, n_samples=3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    if tracker is not None:   # no seed queued for CUDA devices initialised later
        assert all(a is b for a, b in zip(queued, [c and c[0] for c in tracker.get_calls()]))
    torch.manual_seed(12345)
    torch.rand(10)
    again = torch_ntk.monte_carlo_ntk(small_mlp, x, n_samples=3, seed=7)
    assert torch.equal(first.mean, again.mean) and torch.equal(first.stderr, again.stderr)
    other = torch_ntk.monte_carlo_ntk(small_mlp, x, n_samples=3, seed=8)
    assert not torch.allclose(first.mean, other.mean)


class DrawsInForward(nn.Module):
    """Draws from the global generator in forward without using the draw (deterministic)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_mlp()

    def forward(self, x):
        torch.rand(3)
        return self.net(x)


def test_kernel_computations_do_not_move_the_models_stream():
    x = torch.randn(4, 3, dtype=F64)
    result = torch_ntk.monte_carlo_ntk(DrawsInForward, x, n_samples=3, mode="trace", seed=2)
    ks = by_hand(DrawsInForward, x, None, 3, 2, "trace")   # built before any forward
    assert_tight(result.mean, ks.mean(0))


def test_make_model_is_called_n_samples_times_one_model_at_a_time():
    x = torch.randn(3, 3, dtype=F64)
    make = Counter()
    torch_ntk.monte_carlo_ntk(make, x, n_samples=4)
    assert make.calls == 4
    assert make.alive_at_call == [0, 0, 0, 0]   # the previous model was dropped first


# Convergence to the infinite-width limit

def test_ntkmlp_mean_converges_to_analytic_ntk():
    x = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    limit = torch_ntk.analytic_ntk(x, depth=3, activation="relu", b_std=0.1)
    wrong = torch_ntk.analytic_ntk(x, depth=2, activation="relu", b_std=0.1)

    def rel_error(width, target):
        make = lambda: torch_ntk.NTKMLP(3, width, depth=3, out_features=2,  # noqa: E731
                                        activation="relu", b_std=0.1, dtype=F64)
        mean = torch_ntk.monte_carlo_ntk(make, x, n_samples=16, seed=0).mean / 2
        return float((mean - target).norm() / target.norm()), mean

    wide, mean_wide = rel_error(512, limit)
    narrow, _ = rel_error(16, limit)
    assert wide < 0.1, wide            # Monte Carlo error about 0.03 at width 512
    assert wide < narrow, (wide, narrow)
    assert float((mean_wide - wrong).norm() / wrong.norm()) > 0.2   # depth 2 is far away


def conv_net(channels: int, second: bool = True) -> nn.Module:
    layers = [torch_ntk.NTKConv2d(1, channels, 3, padding="same"), nn.ReLU()]
    if second:
        layers += [torch_ntk.NTKConv2d(channels, channels, 3, padding="same"), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), torch_ntk.NTKLinear(channels, 1, w_std=1.0)]
    return nn.Sequential(*layers).double()


def test_conv_network_mean_is_within_stderr_of_analytic_ntk():
    x = torch.randn(4, 1, 6, 6, dtype=F64, generator=torch.Generator().manual_seed(2))
    result = torch_ntk.monte_carlo_ntk(lambda: conv_net(64), x, n_samples=32, seed=0)
    limit = torch_ntk.analytic_ntk(conv_net(4), x)
    allowed = 4 * result.stderr + 0.02 * limit.abs()    # noise, and a small width bias
    assert bool(((result.mean - limit).abs() <= allowed).all()), (result, limit)
    assert float((result.stderr / limit.abs()).max()) < 0.1    # the check has teeth ...
    one_conv = torch_ntk.analytic_ntk(conv_net(4, second=False), x)
    assert not bool(((result.mean - one_conv).abs() <= allowed).all())  # ... for a wrong net


# Networks without a closed form

def test_max_pooling_network():
    make = lambda: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),  # noqa: E731
                                 nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 2)).double()
    x1, x2 = torch.randn(3, 1, 6, 6, dtype=F64), torch.randn(2, 1, 6, 6, dtype=F64)
    with pytest.raises(ValueError):
        torch_ntk.analytic_ntk(make(), x1)
    result = torch_ntk.monte_carlo_ntk(make, x1, x2, n_samples=3, mode="full")
    assert result.mean.shape == result.stderr.shape == (3, 2, 2, 2)
    assert bool(torch.isfinite(result.mean).all()) and bool(torch.isfinite(result.stderr).all())
    assert bool((result.stderr > 0).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_models_seeded_and_rng_states_restored():
    x = torch.randn(4, 3, dtype=F64, device="cuda")
    make = lambda: nn.Sequential(nn.Linear(3, 5, device="cuda"), nn.Tanh(),  # noqa: E731
                                 nn.Linear(5, 2, device="cuda")).double()
    cpu, gpu = torch.get_rng_state(), torch.cuda.get_rng_state()
    result = torch_ntk.monte_carlo_ntk(make, x, n_samples=3, mode="full", seed=4)
    assert torch.equal(torch.get_rng_state(), cpu) and torch.equal(torch.cuda.get_rng_state(), gpu)
    assert result.mean.device == x.device
    ks = by_hand(make, x, None, 3, 4, "full")
    assert_tight(result.mean, ks.mean(0))
    assert_tight(result.stderr, ks.std(0) / math.sqrt(3))


# Errors

X = torch.zeros(2, 3, dtype=F64)


@pytest.mark.parametrize("make_model, match", [
    (3, "make_model must be a callable"),
    (nn.Linear(3, 1), "make_model must be a function that builds"),
])
def test_make_model_that_is_not_a_factory(make_model, match):
    with pytest.raises(TypeError, match=match):
        torch_ntk.monte_carlo_ntk(make_model, X, n_samples=2)


def test_make_model_returning_something_else():
    with pytest.raises(TypeError, match=r"make_model\(\) must return a torch.nn.Module, got "
                                        "NoneType"):
        torch_ntk.monte_carlo_ntk(lambda: None, X, n_samples=2)


@pytest.mark.parametrize("n_samples, error", [
    (1, ValueError), (0, ValueError), (-3, ValueError),
    (2.0, TypeError), (True, TypeError), ("4", TypeError), (None, TypeError)])
def test_bad_n_samples(n_samples, error):
    make = Counter()
    with pytest.raises(error, match="n_samples"):
        torch_ntk.monte_carlo_ntk(make, X, n_samples=n_samples)
    assert make.calls == 0


@pytest.mark.parametrize("seed, error", [
    (1.5, TypeError), (True, TypeError), (None, TypeError), ("0", TypeError),
    (2 ** 64, ValueError), (-2 ** 63 - 1, ValueError)])
def test_bad_seed(seed, error):
    make = Counter()
    with pytest.raises(error, match="seed"):
        torch_ntk.monte_carlo_ntk(make, X, n_samples=2, seed=seed)
    assert make.calls == 0


def test_bad_mode_raises_on_the_first_model():
    make = Counter()
    with pytest.raises(ValueError, match="mode"):
        torch_ntk.monte_carlo_ntk(make, X, n_samples=5, mode="bogus")
    assert make.calls == 1


def test_outputs_that_change_size_between_samples():
    sizes = iter([2, 2, 3])
    with pytest.raises(ValueError, match=r"model 3 has shape \(2, 2, 3\).*same number of outputs"):
        torch_ntk.monte_carlo_ntk(lambda: small_mlp(next(sizes)), X, n_samples=3,
                                  mode="diagonal")


def test_the_same_module_returned_twice():
    net = small_mlp()
    with pytest.raises(ValueError, match="same module twice"):
        torch_ntk.monte_carlo_ntk(lambda: net, X, n_samples=2)


def test_make_model_errors_propagate():
    def broken():
        raise RuntimeError("no such layer")
    with pytest.raises(RuntimeError, match="no such layer"):
        torch_ntk.monte_carlo_ntk(broken, X, n_samples=2)
