"""Monte Carlo estimate of the expected NTK at initialisation: the mean of ``empirical_ntk``
over freshly initialised models, with its standard error (any module, e.g. max pooling, which
has no infinite-width rule in ``analytic_ntk``)."""
from __future__ import annotations

import contextlib
import gc
import numbers
import weakref
from typing import Callable, Iterator, NamedTuple, Optional

import torch
from torch import Tensor, nn

_SEED_RANGE = (-0x8000_0000_0000_0000, 0xFFFF_FFFF_FFFF_FFFF)  # what torch.Generator accepts


class MonteCarloNTK(NamedTuple):
    """Result of ``monte_carlo_ntk``; both fields have the shape and dtype of one
    ``empirical_ntk`` in the mode asked for.

    Attributes:
        mean (Tensor): the sample mean of the kernels.
        stderr (Tensor): its standard error, the sample standard deviation (``n - 1``) over
            ``sqrt(n)``, entry by entry.
    """

    mean: Tensor
    stderr: Tensor


def monte_carlo_ntk(make_model: Callable[[], nn.Module], x1: Tensor,
                    x2: Optional[Tensor] = None, *, n_samples: int, mode: str = "trace",
                    seed: int = 0, method: str = "auto",
                    batch_size: Optional[int] = None) -> MonteCarloNTK:
    """The mean of ``empirical_ntk`` over ``n_samples`` freshly initialised models
    (``make_model()`` builds one), for architectures without a closed form (max pooling, any
    module), with the standard error of the mean.

    As the widths grow, the mean of an NTK-parameterised network (``NTKMLP``, ``NTKLinear``,
    ``NTKConv1d``/``NTKConv2d``) tends to ``analytic_ntk`` times the number of outputs (in
    ``mode="trace"``). Models are built and used one at a time, never kept together: memory is
    that of one model and one ``empirical_ntk`` call, time ``n_samples`` of them.

    Seeding: the models are built, in order, by ``make_model()`` after seeding the CPU
    generator (and that of x1's device, when it is an accelerator) with ``seed``, so sample
    ``i`` is the ``i``-th model that ``torch.manual_seed(seed)`` followed by ``n_samples`` calls
    of ``make_model()`` gives (draws made while computing a kernel are undone). The
    result depends on ``seed`` only, not on the global random state, which is left as it was.

    Args:
        make_model (callable): ``() -> nn.Module``, building a new, randomly initialised model
            on every call (e.g. ``lambda: torch_ntk.NTKMLP(3, 512, depth=3)``); its models take
            x1 and must have the same number K of outputs per sample each time.
        x1 (Tensor[N1, *in_shape]): first batch, on the models' device.
        x2 (Tensor[N2, *in_shape], optional): second batch; ``None`` reuses x1.
        n_samples (int): number of models averaged, ≥ 2 (a standard error needs two).
        mode (str): ``"trace"`` -> Tensor[N1, N2] (``Σ_a Θ_aa``), ``"full"`` ->
            Tensor[N1, N2, K, K], ``"diagonal"`` -> Tensor[N1, N2, K], as ``empirical_ntk``.
        seed (int): seed of the models' initialisation.
        method (str), batch_size (int, optional): passed to ``empirical_ntk``.

    Returns:
        MonteCarloNTK: namedtuple ``(mean, stderr)``, both of the shape listed under ``mode``,
        the models' dtype and on x1's device; accumulated in float64 (Welford's update) and
        cast back. ``stderr`` is the sample standard deviation (with ``n - 1``) over
        ``sqrt(n_samples)``, entry by entry.

    Raises:
        TypeError: ``make_model`` not callable (or a module itself, not a function building
            one), ``make_model()`` returning something other than an ``nn.Module``,
            ``n_samples`` or ``seed`` not an int; whatever ``empirical_ntk`` raises for the
            inputs or the models.
        ValueError: ``n_samples < 2``, ``seed`` out of range, ``make_model()`` returning the
            same module twice, models whose kernels change shape (K) or dtype from one sample to
            the next; an unknown ``mode``/``method`` (from ``empirical_ntk``, on the first model,
            before any other is built).

    Example:
        >>> x = torch.randn(5, 1, 8, dtype=torch.float64)
        >>> make = lambda: nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU(), nn.MaxPool1d(2),
        ...                              nn.Flatten(), nn.Linear(12, 1)).double()
        >>> k = torch_ntk.monte_carlo_ntk(make, x, n_samples=10)
        >>> k.mean.shape, k.stderr.shape
        (torch.Size([5, 5]), torch.Size([5, 5]))
    """
    from torch_ntk.empirical import empirical_ntk  # torch_ntk.empirical imports this package

    _check_make_model(make_model)
    _check_integer("n_samples", n_samples, "the number of models averaged, e.g. 32")
    if n_samples < 2:
        raise ValueError(f"monte_carlo_ntk: n_samples must be at least 2 (a standard error "
                         f"needs two samples), got {n_samples}.")
    _check_integer("seed", seed, "the seed of the models' initialisation")
    if not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]:
        raise ValueError(f"monte_carlo_ntk: seed must lie in [{_SEED_RANGE[0]}, "
                         f"{_SEED_RANGE[1]}] (torch.manual_seed's range), got {seed}.")
    n_samples, seed = int(n_samples), int(seed)
    device = x1.device if isinstance(x1, Tensor) else torch.device("cpu")

    count, mean, m2 = 0, None, None
    first: Optional[tuple] = None
    previous = None   # weak reference to the last model: a factory returning one module twice
    collect_all = True
    with _seeded(device, seed):
        for i in range(n_samples):
            model = make_model()
            if not isinstance(model, nn.Module):
                raise TypeError(f"monte_carlo_ntk: make_model() must return a torch.nn.Module, "
                                f"got {type(model).__name__} (call {i + 1} of {n_samples}).")
            if previous is not None and previous() is model:
                raise ValueError("monte_carlo_ntk: make_model() returned the same module twice; "
                                 "it must build a fresh model on each call, e.g. "
                                 "make_model=lambda: MyNet(), not lambda: net.")
            with _forked(device):   # the kernel's computation doesn't move the models' stream
                k = empirical_ntk(model, x1, x2, mode=mode, method=method,
                                  batch_size=batch_size)
            previous = weakref.ref(model)
            del model
            collect_all = _release(previous, collect_all)   # one model alive at a time
            if first is None:
                first = (tuple(k.shape), k.dtype)
            elif (tuple(k.shape), k.dtype) != first:
                raise ValueError(
                    f"monte_carlo_ntk: the kernel of model {i + 1} has shape {tuple(k.shape)} "
                    f"and dtype {k.dtype}, the first model's {first[0]} and {first[1]}: "
                    "make_model() must build models with the same number of outputs and dtype "
                    "every time.")
            # Welford's update in float64: mean_n = mean_{n-1} + δ / n, M2 += δ · (k - mean_n).
            wide = k.to(_accumulating_dtype(k))
            del k
            count += 1
            if mean is None:
                mean, m2 = wide.clone(), torch.zeros_like(wide)
            else:
                delta = wide - mean
                mean.add_(delta, alpha=1.0 / count)
                m2.addcmul_(delta, wide - mean)
    stderr = (m2 / ((count - 1) * count)).sqrt_()
    dtype = first[1]
    return MonteCarloNTK(mean.to(dtype), stderr.to(dtype))


# Internal helpers

def _check_make_model(make_model) -> None:
    if isinstance(make_model, nn.Module):
        raise TypeError(f"monte_carlo_ntk: make_model must be a function that builds a fresh "
                        f"model on each call, e.g. lambda: MyNet(); got a module itself "
                        f"({type(make_model).__name__}). For the kernel of this one model use "
                        f"torch_ntk.empirical_ntk.")
    if not callable(make_model):
        raise TypeError(f"monte_carlo_ntk: make_model must be a callable () -> nn.Module that "
                        f"builds a freshly initialised model, e.g. lambda: MyNet(); got "
                        f"{type(make_model).__name__}.")


def _check_integer(arg: str, val, hint: str) -> None:
    if isinstance(val, bool) or not isinstance(val, numbers.Integral):
        raise TypeError(f"monte_carlo_ntk: {arg} must be an int ({hint}), "
                        f"got {type(val).__name__}.")


def _release(model: weakref.ref, collect_all: bool) -> bool:
    """Frees the model just dropped, now rather than at the next garbage collection: a call of
    ``empirical_ntk`` leaves reference cycles that hold the model (its parameters, perhaps
    device memory). The young generations hold them almost always (well under a millisecond);
    a full collection is tried when they don't, until one finds the model still referenced
    elsewhere (the caller keeps it: nothing to free). Returns whether to try it again."""
    if model() is None:
        return collect_all
    gc.collect(1)
    if model() is None or not collect_all:
        return collect_all
    gc.collect()
    return model() is None


def _accumulating_dtype(k: Tensor) -> torch.dtype:
    """float64, or float32 where the device has no float64 (MPS)."""
    return torch.float32 if k.device.type == "mps" else torch.float64


def _device_rng(device: torch.device):
    """(device type, [device]) whose generator models built on ``device`` draw from, or None."""
    if device.type in ("cpu", "meta"):
        return None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return "cuda", [index]
    return device.type, [device]


@contextlib.contextmanager
def _forked(device: torch.device) -> Iterator[None]:
    """The CPU generator's state (and that of ``device``) restored on exit."""
    rng = _device_rng(device)
    if rng is None:
        with torch.random.fork_rng(devices=[]):
            yield
    else:
        with torch.random.fork_rng(devices=rng[1], device_type=rng[0]):
            yield


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Inside: the CPU generator and ``device``'s seeded with ``seed``; on exit, both as they
    were. Only those two are seeded (``torch.manual_seed`` would also queue a seed for every
    CUDA device not yet initialised, which would outlive the block)."""
    with _forked(device):
        torch.default_generator.manual_seed(seed)
        rng = _device_rng(device)
        if rng is not None:
            if rng[0] == "cuda":
                with torch.cuda.device(rng[1][0]):
                    torch.cuda.manual_seed(seed)
            else:
                torch.get_device_module(rng[0]).manual_seed(seed)
        yield

