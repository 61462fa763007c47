"""Every user-input check of empirical_ntk, with the message that says what to do."""
from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from typing import Iterator

import torch
from torch import Tensor, nn

from torch_ntk import _modes

MODES = _modes.USER_MODES
METHODS = ("auto", "structured", "jacobian")

_STOCHASTIC = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
               nn.FeatureAlphaDropout)


def check_options(mode: str, method: str, batch_size: int | None) -> int | None:
    """Validates the keyword options of empirical_ntk; returns batch_size as an int."""
    if mode not in MODES:
        raise ValueError(f"empirical_ntk: mode must be one of {MODES}, got {mode!r}.")
    if method not in METHODS:
        raise ValueError(f"empirical_ntk: method must be one of {METHODS}, got {method!r}.")
    if batch_size is not None and (isinstance(batch_size, bool)
                                   or not isinstance(batch_size, numbers.Integral)
                                   or batch_size < 1):
        raise ValueError(
            f"empirical_ntk: batch_size must be a positive int or None, got {batch_size!r}.")
    return None if batch_size is None else int(batch_size)


def check_materialised(model: nn.Module) -> None:
    """Refuses a model with lazy modules not yet run, before anything touches them."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and \
                module.has_uninitialized_params():
            raise ValueError(
                f"empirical_ntk: module {name or type(model).__name__!r} "
                f"({type(module).__name__}) has uninitialised (lazy) parameters, so the model "
                "has no parameters to differentiate yet. Run one forward on an example batch "
                "first (e.g. model(x1[:1])) to materialise them.")


def check_model(model: nn.Module, select=None) -> dict[str, Tensor]:
    """Returns the parameters the kernel sums over, by name; rejects models that can't have an
    NTK.

    Args:
        select: ``None`` (every parameter with ``requires_grad``), an iterable of parameter
            names, or a callable ``(name, param) -> bool``; the others are constants.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"empirical_ntk: model must be a torch.nn.Module, got {type(model).__name__}.")
    params = _selected(model, select)
    hooked = [name for name, p in params.items() if p._backward_hooks]
    if hooked:
        raise ValueError(
            f"empirical_ntk: parameter(s) {', '.join(hooked)} have gradient hooks "
            "(Tensor.register_hook), which change what autograd returns as their gradient, "
            "while the NTK is taken over the derivatives ∂f/∂θ. Remove the hooks for the call "
            "(keep the handles register_hook returns and call .remove()).")
    if not params:
        raise ValueError(
            "empirical_ntk: the model has no parameter with requires_grad=True (or params "
            "selects none), so its NTK is empty. Unfreeze or select the parameters the kernel "
            "should be taken over.")
    dtypes = {p.dtype for p in params.values()}
    devices = {p.device for p in params.values()}
    if len(dtypes) > 1 or len(devices) > 1:
        raise ValueError(
            f"empirical_ntk: all trainable parameters must share one dtype and device; found "
            f"dtypes {sorted(map(str, dtypes))} on devices {sorted(map(str, devices))}. "
            "Call model.to(device, dtype) first.")
    dtype = next(iter(dtypes))
    if next(iter(devices)).type == "meta":
        raise ValueError(
            "empirical_ntk: the model's parameters are meta tensors, which have no values to "
            "differentiate at. Materialise them first (e.g. model.to_empty(device='cpu') and "
            "load a state dict).")
    if not dtype.is_floating_point:
        raise ValueError(f"empirical_ntk: trainable parameters must be floating point, got {dtype}.")
    for name, module in model.named_modules():
        label = name or type(model).__name__
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise ValueError(
                f"empirical_ntk: module {label!r} ({type(module).__name__}) is in training mode, "
                "where it normalises with batch statistics, so samples interact and the per-sample "
                "NTK is undefined. Call model.eval() first (or use a per-sample norm such as "
                "LayerNorm/GroupNorm).")
        if isinstance(module, _STOCHASTIC) and module.training and module.p > 0:
            raise ValueError(
                f"empirical_ntk: module {label!r} ({type(module).__name__}) is in training mode "
                "and makes the output random, so the NTK is undefined. Call model.eval() first.")
    return params


def check_inputs(x1: Tensor, x2: Tensor | None, param: Tensor) -> None:
    """Checks x1/x2 against each other and against the model's device and dtype."""
    for name, x in (("x1", x1), ("x2", x2)):
        if x is None:
            continue
        if not isinstance(x, Tensor):
            raise TypeError(f"empirical_ntk: {name} must be a torch.Tensor, got {type(x).__name__}.")
        if x.is_complex():
            raise ValueError(
                f"empirical_ntk: {name} is complex ({x.dtype}); the NTK here is defined for real "
                "inputs and outputs. Pass the real and imaginary parts as real features.")
        if x.device.type == "meta":
            raise ValueError(
                f"empirical_ntk: {name} is a meta tensor, which has no values to differentiate "
                "at. Pass inputs with data (e.g. on 'cpu' or 'cuda').")
        if x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(
                f"empirical_ntk: {name} must have a non-empty batch dimension first, got shape "
                f"{tuple(x.shape)}.")
        if x.device != param.device:
            raise ValueError(
                f"empirical_ntk: {name} is on {x.device} but the model's parameters are on "
                f"{param.device}. Move them to one device (e.g. {name}.to({str(param.device)!r})).")
        if x.is_floating_point() and x.dtype != param.dtype:
            raise ValueError(
                f"empirical_ntk: {name} has dtype {x.dtype} but the model's parameters have "
                f"{param.dtype}. Cast one of them (e.g. {name}.to({param.dtype})).")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError(f"empirical_ntk: {name} contains NaN or infinite values.")
    if x2 is not None and x2.shape[1:] != x1.shape[1:]:
        raise ValueError(
            f"empirical_ntk: x1 and x2 must match after the batch dimension; got x1 "
            f"{tuple(x1.shape)} and x2 {tuple(x2.shape)}. Pass x2=None for the kernel of x1 with "
            "itself.")
    if x2 is not None and x2.dtype != x1.dtype:
        raise ValueError(f"empirical_ntk: x1 has dtype {x1.dtype} but x2 has {x2.dtype}.")


@contextlib.contextmanager
def checkpoint_errors() -> Iterator[None]:
    """Turns autograd's refusal of a reentrant ``torch.utils.checkpoint``, or of a parameter the
    forward stopped tracking, into a ValueError that says what to change."""
    try:
        yield
    except RuntimeError as exc:
        if "One of the differentiated Tensors does not require grad" in str(exc):
            raise ValueError(
                "empirical_ntk: a trainable parameter stopped requiring grad during the model's "
                "forward (e.g. requires_grad_(False) inside forward), so autograd can't "
                "differentiate it. Set requires_grad before the call, not in forward.") from exc
        if "use_reentrant" not in str(exc):
            raise
        raise ValueError(
            "empirical_ntk: the model runs torch.utils.checkpoint with use_reentrant=True, "
            "which torch.autograd.grad can't differentiate through, so no per-sample gradient "
            "exists here. Call checkpoint(..., use_reentrant=False) (same memory savings, and "
            "PyTorch's recommended form).") from exc


@contextlib.contextmanager
def checkpoint_without_gradients() -> Iterator[None]:
    """Refuses a forward in which a reentrant ``torch.utils.checkpoint`` got no input that
    requires grad: autograd then gives the parameters inside it no gradient at all (PyTorch
    only warns), so their share of the kernel would silently be zero. Other warnings of the
    forward are passed on."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        if "None of the inputs have requires_grad=True" in str(w.message):
            raise ValueError(
                "empirical_ntk: the model runs torch.utils.checkpoint(use_reentrant=True) on "
                "inputs that don't require grad, so autograd gives the parameters inside the "
                "checkpointed region no gradient (their share of the NTK would be lost). Call "
                "checkpoint(..., use_reentrant=False).")
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def check_output(f: object, n: int, where: str) -> Tensor:
    """Checks one forward result ``f`` (Tensor[n, *out_shape]) and returns it flat (n, K)."""
    if not isinstance(f, Tensor):
        raise TypeError(
            f"empirical_ntk: the model must return one Tensor, got {type(f).__name__}. Wrap it so "
            "that forward returns a single Tensor of shape (N, ...).")
    if f.dim() < 1 or f.shape[0] != n:
        raise ValueError(
            f"empirical_ntk: the model mapped a batch of {n} inputs to an output of shape "
            f"{tuple(f.shape)}; the output must keep the batch dimension first.")
    if not f.is_floating_point():
        raise TypeError(
            "empirical_ntk: the model's output must be a real floating-point Tensor to have "
            f"gradients, got dtype {f.dtype}. Return the output before any rounding, argmax or "
            "cast (e.g. .long(), .bool()), and split a complex output into real and imaginary "
            "parts (torch.view_as_real).")
    if f.numel() == 0:
        raise ValueError(
            f"empirical_ntk: the model has no outputs per sample (output shape "
            f"{tuple(f.shape)}, K = 0), so its NTK is empty. Return at least one output.")
    if not bool(torch.isfinite(f).all()):
        raise ValueError(
            f"empirical_ntk: the model's output is not finite (NaN or inf) on {where}; its NTK is "
            "undefined there. Check the inputs and the parameters.")
    return f.reshape(n, -1)


def check_independent(f_batch: Tensor, f_single: Tensor, row: int,
                      dtype: torch.dtype | None = None) -> None:
    """Raises when row ``row`` of a batched forward differs from the same sample run alone
    (to the rounding of ``dtype``, the model's computing dtype; the outputs' by default)."""
    scale = float(f_batch.abs().max()) + float(f_single.abs().max()) + 1e-30
    tol = rounding_tolerance(dtype or f_batch.dtype, f_batch.shape[-1])
    if float((f_batch[row] - f_single[0]).abs().max()) > tol * scale:
        raise ValueError(
            "empirical_ntk: the model's output for a sample depends on the other samples in the "
            "batch (e.g. batch statistics or attention across the batch), so the per-sample NTK "
            "is undefined. Make the forward pass act on each sample independently.")


def check_kernel_fits(wide: Tensor, dtype: torch.dtype, row: int, col: int) -> None:
    """Raises when a kernel tile, recomputed in float64, is not finite in ``dtype``."""
    finite = torch.isfinite(wide)
    if dtype != torch.float64:
        finite &= wide.abs() <= torch.finfo(dtype).max
    if not bool(finite.all()):
        n, m = (int(i) for i in (~finite).nonzero()[0, :2])
        raise ValueError(
            f"empirical_ntk: the kernel entry of samples {row + n} (x1) and {col + m} (x2) is "
            f"not finite in {dtype} (it overflows, or the model's gradients are not finite "
            "there). Compute it in a wider dtype, e.g. model.double() with float64 inputs.")


def check_deterministic(f_first: Tensor, f_again: Tensor,
                        dtype: torch.dtype | None = None) -> None:
    """Raises when two forward passes on the same inputs disagree (a random forward), beyond
    the rounding of ``dtype`` (as for ``check_independent``)."""
    scale = float(f_first.abs().max()) + 1e-30
    tol = rounding_tolerance(dtype or f_first.dtype, f_first.shape[-1])
    if float((f_first - f_again).abs().max()) > tol * scale:
        raise ValueError(
            "empirical_ntk: two forward passes on the same inputs gave different outputs, so "
            "the model is random (e.g. dropout in training mode, or noise drawn in forward) and "
            "its NTK is undefined. Call model.eval() or make the forward deterministic.")


def rounding_tolerance(dtype: torch.dtype, width: int) -> float:
    """Relative difference that rounding alone can cause between batched and single runs.

    Batched and single-sample matmuls may take different kernels and summation orders; their
    results differ by a few ulps times the square root of the reduction length. Checks run
    with TF32 off (``state.exact_matmul``), so this holds on GPUs too.
    """
    return 1e3 * torch.finfo(dtype).eps * max(1.0, math.sqrt(width))


@contextlib.contextmanager
def input_dtype_errors(x: Tensor, params: dict[str, Tensor]) -> Iterator[None]:
    """Turns a dtype error of the model's first forward on non-floating inputs into a clear
    TypeError (integer inputs are legitimate for embeddings, so they can't be refused before)."""
    try:
        yield
    except RuntimeError as exc:
        if x.is_floating_point() or "dtype" not in str(exc).lower():
            raise
        dtype = next(iter(params.values())).dtype
        raise TypeError(
            f"empirical_ntk: the model failed on x1 of dtype {x.dtype}: {exc}. Integer inputs "
            f"suit models that take indices (e.g. nn.Embedding); otherwise cast them to the "
            f"model's dtype, e.g. x1.to({dtype}).") from exc


def check_out(out: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype,
              inputs: tuple[Tensor | None, ...] = (), model: nn.Module | None = None) -> None:
    """Checks a user-supplied ``out=`` tensor the way torch checks an in-place op's output:
    right shape and dtype, real memory with distinct elements, none of it shared with
    ``inputs`` (x1, x2) or with the model's parameters, gradients and buffers."""
    if out is None:
        return
    if not isinstance(out, Tensor):
        raise TypeError(f"empirical_ntk: out must be a torch.Tensor, got {type(out).__name__}.")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype:
        raise ValueError(
            f"empirical_ntk: out must have shape {tuple(shape)} and dtype {dtype} (the model's), "
            f"got shape {tuple(out.shape)} and dtype {out.dtype}.")
    if out.device.type == "meta":
        raise ValueError(
            "empirical_ntk: out is a meta tensor, which has no data to write the kernel into. "
            "Pass out=None, or a tensor on a real device (e.g. torch.empty(shape, device='cpu')).")
    if out.layout != torch.strided:
        raise ValueError(
            f"empirical_ntk: out must be a dense (strided) tensor, got layout {out.layout}. "
            "Pass out=None and convert the result (e.g. .to_sparse()).")
    if out.requires_grad:
        raise ValueError(
            "empirical_ntk: out requires grad, and autograd can't track a kernel written into "
            "it in place. Pass a tensor without requires_grad (e.g. out.detach()).")
    overlap = _internal_overlap(out)
    if overlap is not None:
        raise ValueError(
            f"empirical_ntk: out {overlap} (shape {tuple(out.shape)}, strides {out.stride()}, "
            "e.g. from expand() or as_strided()), so entries would overwrite each other. Pass a "
            "tensor whose elements are distinct, e.g. torch.empty(shape) or out.contiguous().")
    for name, x in zip(("x1", "x2"), inputs):
        if x is not None and _shares_memory(out, x):
            raise ValueError(
                f"empirical_ntk: out shares memory with {name}, which would be overwritten "
                f"while it is read. Pass a separate out tensor (or {name}.clone()).")
    if model is not None:
        for kind, name, t in _model_tensors(model):
            if _shares_memory(out, t):
                raise ValueError(
                    f"empirical_ntk: out shares memory with the model's {kind} {name!r}, which "
                    "the kernel would overwrite (and the forward may read). Pass a separate "
                    "out tensor, e.g. torch.empty(shape).")


# Internal helpers

def _selected(model: nn.Module, select) -> dict[str, Tensor]:
    """The parameters ``check_model``'s ``select`` names (see there), by their first name: a
    tied parameter answers to each of its names (``head.weight`` of a tied embedding)."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    named = dict(model.named_parameters(remove_duplicate=False))
    if select is None:
        return {name: p for name, p in model.named_parameters() if p.requires_grad}
    if callable(select):
        names = [name for name, p in named.items() if select(name, p)]
    elif isinstance(select, (str, bytes)) or not hasattr(select, "__iter__"):
        raise TypeError(
            "empirical_ntk: params must be None, an iterable of parameter names or a callable "
            f"(name, param) -> bool, got {type(select).__name__}.")
    else:
        names = list(select)
    unknown = [n for n in names if n not in named]
    if unknown:
        raise ValueError(
            f"empirical_ntk: params names {unknown} that the model doesn't have; its "
            f"parameters are {list(named)[:20]}{' ...' if len(named) > 20 else ''}.")
    frozen = [n for n in names if not named[n].requires_grad]
    if frozen:
        raise ValueError(
            f"empirical_ntk: params selects parameter(s) {frozen} with requires_grad=False. Set "
            "requires_grad=True on the parameters the kernel should be taken over.")
    return {canonical[id(named[n])]: named[n] for n in names}


_EXACT_OVERLAP_NUMEL = 2 ** 22  # up to this many elements, overlap is decided offset by offset


def _internal_overlap(t: Tensor) -> str | None:
    """Why ``t``'s elements may not be distinct in memory, or None when they are.

    Proved distinct when the dims sorted by stride each step past the extent of the smaller
    ones (any dense or sliced layout); otherwise the element offsets are compared one by one
    when that is cheap, and the tensor is refused as possibly overlapping when it is not.
    """
    dims = [(st, n) for n, st in zip(t.shape, t.stride()) if n > 1]
    if t.numel() <= 1 or torch._debug_has_internal_overlap(t) == 0:
        return None
    if any(st == 0 for st, _ in dims):
        return "has overlapping memory"
    extent = 1
    for st, n in sorted(dims):
        if st < extent:
            break
        extent += (n - 1) * st
    else:
        return None
    if t.numel() > _EXACT_OVERLAP_NUMEL:
        return "may have overlapping memory (its strides interleave)"
    offsets = torch.zeros((), dtype=torch.int64)
    for st, n in dims:
        offsets = (offsets.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * st).reshape(-1)
    return "has overlapping memory" if offsets.unique().numel() < offsets.numel() else None


def _model_tensors(model: nn.Module) -> Iterator[tuple[str, str, Tensor]]:
    """(kind, name, tensor) for the model's parameters, their gradients and its buffers."""
    for name, p in model.named_parameters():
        yield "parameter", name, p
        if p.grad is not None:
            yield "gradient of", name, p.grad
    for name, b in model.named_buffers():
        yield "buffer", name, b

def _shares_memory(a: Tensor, b: Tensor) -> bool:
    """True when the storages of ``a`` and ``b`` overlap (conservative: byte ranges)."""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    try:
        sa, sb = a.untyped_storage(), b.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return False
    if sa.device.type == "meta" or sa.data_ptr() == 0 or sb.data_ptr() == 0:
        return False
    a0, a1 = _byte_range(a)
    b0, b1 = _byte_range(b)
    return a0 < b1 and b0 < a1


def _byte_range(t: Tensor) -> tuple[int, int]:
    steps = [(n - 1) * st * t.element_size() for n, st in zip(t.shape, t.stride())]
    lo = t.data_ptr() + sum(min(0, s) for s in steps)
    return lo, t.data_ptr() + sum(max(0, s) for s in steps) + t.element_size()
