"""Argument checks and the activation table shared by ``analytic_ntk``, ``NTKMLP`` and the NTK
layers."""
from __future__ import annotations

import collections
import functools
import math
import numbers
from typing import Callable, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

ActivationLike = Union[str, Callable[[Tensor], Tensor]]


def _identity(x: Tensor) -> Tensor:
    return x


# The one table of named activations, shared by analytic_ntk and NTKMLP.
ACTIVATIONS: dict = {
    "relu": torch.relu,
    "erf": torch.erf,
    "identity": _identity,
    "tanh": torch.tanh,
    "gelu": F.gelu,  # exact (erf-based)
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
}
GETS = ("nngp", "ntk")


def resolve_activation(activation: ActivationLike, *, caller: str = "analytic_ntk"
                       ) -> Tuple[Optional[str], Callable[[Tensor], Tensor]]:
    """Maps an activation name or callable to ``(name or None, elementwise function)``.

    This is the single table of activations shared by ``analytic_ntk`` and ``NTKMLP``.

    Args:
        activation (str or callable): a key of ``ACTIVATIONS`` or an elementwise callable.
        caller (str): prefix of error messages.
    Returns:
        tuple: the name (``None`` for a callable) and the function.
    Raises:
        ValueError: unknown name. TypeError: neither a string nor a callable.
    """
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"{caller}: unknown activation {activation!r}; expected one of "
                f"{tuple(ACTIVATIONS)} or an elementwise callable such as "
                f"torch.nn.functional.silu.")
        return activation, ACTIVATIONS[activation]
    if callable(activation):
        _check_elementwise(activation, caller)
        return None, activation
    raise TypeError(f"{caller}: activation must be a name in {tuple(ACTIVATIONS)} or a callable "
                    f"Tensor -> Tensor, got {type(activation).__name__}.")


# Internal helpers

def _check_elementwise(fn: Callable[[Tensor], Tensor], caller: str) -> None:
    """Raises unless ``fn`` maps each entry on its own (softmax, cumsum, ... don't)."""
    z = torch.linspace(-2.0, 2.0, 7, dtype=torch.float64).reshape(1, 7)
    try:
        whole = fn(z)
        alone = [fn(z[:, i:i + 1]) for i in range(z.shape[1])]
    except Exception as exc:  # the user's callable: any failure is reported as such
        raise TypeError(f"{caller}: the activation callable failed on a float64 tensor of "
                        f"shape (1, 7): {type(exc).__name__}: {exc}") from exc
    if not (isinstance(whole, Tensor) and whole.shape == z.shape
            and all(isinstance(a, Tensor) and a.shape == (1, 1) for a in alone)):
        raise TypeError(f"{caller}: the activation must act elementwise and keep the shape "
                        f"(Tensor -> Tensor of the same shape); on shape (1, 7) it returned "
                        f"{getattr(whole, 'shape', type(whole).__name__)}.")
    if not torch.allclose(whole, torch.cat(alone, dim=1), rtol=1e-10, atol=1e-12):
        raise ValueError(
            f"{caller}: the activation must act elementwise (each output entry a function of "
            "the same input entry alone, shape kept), like torch.tanh or "
            "torch.nn.functional.silu; got a callable that mixes entries (e.g. softmax or "
            "cumsum).")


def _check_get(get) -> Tuple[str, ...]:
    fields = (get,) if isinstance(get, str) else get
    try:
        fields = tuple(fields)
    except TypeError:
        fields = None
    if (not fields or any(not isinstance(f, str) or f not in GETS for f in fields)
            or len(set(fields)) != len(fields)):
        raise ValueError(f"analytic_ntk: get must be one of {GETS} or a tuple of distinct names "
                         f"from it such as ('nngp', 'ntk'), got {get!r}.")
    return fields


def _check_options(depth, w_std, b_std, quadrature_degree, batch_size) -> None:
    _check_int("analytic_ntk", "depth", depth, 1,
               "the number of affine layers; 1 is a linear model")
    _check_std("analytic_ntk", "w_std", w_std)
    _check_std("analytic_ntk", "b_std", b_std)
    _check_int("analytic_ntk", "quadrature_degree", quadrature_degree, 4,
               "Gauss-Hermite nodes, e.g. 256")
    if quadrature_degree > 4096:
        raise ValueError(f"analytic_ntk: quadrature_degree must be at most 4096, "
                         f"got {quadrature_degree}.")
    if batch_size is not None:
        _check_int("analytic_ntk", "batch_size", batch_size, 1, "or None for the default")


def _check_int(caller: str, arg: str, val, low: int, hint: str) -> None:
    if isinstance(val, bool) or not isinstance(val, numbers.Integral):
        raise TypeError(f"{caller}: {arg} must be an int ({hint}), got {type(val).__name__}.")
    if val < low:
        raise ValueError(f"{caller}: {arg} must be an int ≥ {low} ({hint}), got {val!r}.")


def _check_std(caller: str, arg: str, val) -> None:
    if isinstance(val, bool) or not isinstance(val, numbers.Real):
        raise TypeError(f"{caller}: {arg} must be a float, got {type(val).__name__}.")
    if not math.isfinite(val) or val < 0:
        raise ValueError(f"{caller}: {arg} must be a finite float ≥ 0, got {val!r}.")


def _check_inputs(x1, x2) -> Tuple[Tensor, Tensor]:
    """Inputs of the fully-connected form: (N, n0) floating-point tensors; x2 None is x1."""
    for arg, x in (("x1", x1), ("x2", x2)):
        if x is None:
            continue
        _check_float_tensor(arg, x)
        if x.dim() != 2:
            raise ValueError(f"analytic_ntk: {arg} must have shape (N, n0), got "
                             f"{tuple(x.shape)}; flatten the sample dimensions with "
                             f"{arg}.flatten(1).")
        if x.shape[1] == 0:
            raise ValueError(f"analytic_ntk: {arg} has no features (shape {tuple(x.shape)}).")
        _check_finite(arg, x)
    if x2 is None:
        return x1, x1
    if x1.shape[1] != x2.shape[1]:
        raise ValueError(f"analytic_ntk: x1 and x2 must have the same number of features; got "
                         f"x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)}. Pass x2=None for the "
                         f"kernel of x1 with itself.")
    _check_alike(x1, x2)
    return x1, x2


def _check_model_inputs(x1, x2) -> Tuple[Tensor, Optional[Tensor]]:
    """Inputs of the module form: (N, *in_shape) floating-point tensors, x2 None or alike."""
    for arg, x in (("x1", x1), ("x2", x2)):
        if x is None:
            continue
        _check_float_tensor(arg, x)
        if x.dim() < 2:
            raise ValueError(f"analytic_ntk: {arg} must have a batch axis and the model's "
                             f"input axes, (N, C, *spatial) or (N, features); got "
                             f"{tuple(x.shape)}.")
        _check_finite(arg, x)
    if x2 is not None:
        if x1.shape[1:] != x2.shape[1:]:
            raise ValueError(f"analytic_ntk: x1 and x2 must have the same sample shape; got "
                             f"x1 {tuple(x1.shape)} and x2 {tuple(x2.shape)}.")
        _check_alike(x1, x2)
    return x1, x2


def _check_float_tensor(arg: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"analytic_ntk: {arg} must be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(f"analytic_ntk: {arg} must be a floating-point tensor, got {x.dtype}; "
                        f"convert with {arg}.double() (float64 is recommended).")


def _check_finite(arg: str, x: Tensor) -> None:
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"analytic_ntk: {arg} contains NaN or infinite values.")


def _check_alike(x1: Tensor, x2: Tensor) -> None:
    if x1.device != x2.device:
        raise ValueError(f"analytic_ntk: x1 is on {x1.device} but x2 is on {x2.device}; "
                         f"move both to the same device.")
    if x1.dtype != x2.dtype:
        raise ValueError(f"analytic_ntk: x1 is {x1.dtype} but x2 is {x2.dtype}; "
                         f"convert both to the same dtype.")


@functools.lru_cache(maxsize=None)
def _kernels_type(fields: Tuple[str, ...]):
    return collections.namedtuple("Kernels", fields)


