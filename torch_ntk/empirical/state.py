"""What a call must leave as it found it, and the settings every forward of a call runs under.

``ModelState`` holds the locks of a model's modules and tensors and restores its registered
tensors, their values, gradients and training flags. ``no_autocast`` and
``exact_matmul`` set the switches of one call; the process-wide ones among them are saved by
the first call that needs them and restored by the last, so overlapping calls from several
threads leave the user's settings as they were.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Callable, ContextManager, Iterator

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class _SharedSwitch:
    """Process-wide settings held while at least one call needs them.

    The first caller to enter saves the user's settings and sets ours (``setup``, a context
    manager whose exit restores them); callers entering meanwhile only count; the last one to
    leave restores. Nested and concurrent entries are both fine.
    """

    def __init__(self, setup: Callable[[], ContextManager[None]]) -> None:
        self._setup = setup
        self._guard = threading.Lock()
        self._count = 0
        self._stack: contextlib.ExitStack | None = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._guard:
            if self._count == 0:
                stack = contextlib.ExitStack()
                stack.enter_context(self._setup())
                self._stack = stack
            self._count += 1
        try:
            yield
        finally:
            with self._guard:
                self._count -= 1
                if self._count == 0:
                    stack, self._stack = self._stack, None
                    stack.close()


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    """Attention through the math backend of scaled_dot_product_attention, and without the
    nested-tensor fast path of nn.MultiheadAttention / nn.TransformerEncoder (fused kernels
    have no batching rules, and the fast path hands nested tensors to the probes)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


@contextlib.contextmanager
def _tf32_off() -> Iterator[None]:
    """TF32 off for CUDA matmuls and cuDNN, restored exactly in either of torch's APIs."""
    backends = torch.backends
    leaves = [leaf for leaf in (getattr(backends.cuda, "matmul", None),
                                getattr(backends.cudnn, "conv", None),
                                getattr(backends.cudnn, "rnn", None))
              if leaf is not None and hasattr(leaf, "fp32_precision")]
    precisions = [leaf.fp32_precision for leaf in leaves]
    try:
        legacy = backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32
    except RuntimeError:  # the user set the new fp32_precision API: the legacy reads refuse
        legacy = None
    if legacy is None:
        for leaf in leaves:
            leaf.fp32_precision = "ieee"
    else:
        matmul_precision = _float32_matmul_precision()
        backends.cuda.matmul.allow_tf32 = backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        if legacy is not None:
            backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32 = legacy
            # allow_tf32 is coarser than the precision ("medium" comes back as "high")
            if matmul_precision is not None and _float32_matmul_precision() != matmul_precision:
                torch.set_float32_matmul_precision(matmul_precision)
        for leaf, precision in zip(leaves, precisions):
            if leaf.fp32_precision != precision:
                leaf.fp32_precision = precision


def _float32_matmul_precision() -> str | None:
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:  # torch refuses to answer when the legacy and new APIs were mixed
        return None


@contextlib.contextmanager
def _threads_left_free() -> Iterator[None]:
    """torch's intra-op threads capped at the CPUs other processes leave free, then restored.

    A parallel region ends when its slowest thread does; a thread that shares its core with a
    busy process waits for a time slice in every one of a call's many small regions (measured:
    ResNet-18, N = 8, 4× slower at 2 threads with one core busy, 1.9× at 1 thread).
    """
    threads = torch.get_num_threads()
    wanted = max(1, min(threads, _cpus() - _busy_elsewhere()))
    if wanted < threads:
        torch.set_num_threads(wanted)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _busy_elsewhere(looks: int = 3, apart_s: float = 5e-4) -> int:
    """CPUs that other processes keep busy: runnable tasks that are not this process's own
    threads (whose pool may still spin after a parallel region), the least of a few looks (a
    process that computes is runnable at every look); 0 where ``/proc`` can't be read."""
    least = None
    for i in range(looks):
        try:
            with open("/proc/stat") as f:
                running = next(int(line.split()[1]) for line in f
                               if line.startswith("procs_running"))
            own = sum(_thread_running(tid) for tid in os.listdir("/proc/self/task"))
        except (OSError, StopIteration, ValueError, IndexError):
            return 0
        others = max(0, running - max(1, own))
        least = others if least is None else min(least, others)
        if i + 1 < looks:
            time.sleep(apart_s)
    return least or 0


def _thread_running(tid: str) -> bool:
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "R"
    except (OSError, IndexError):
        return False


_ATTENTION = _SharedSwitch(_math_attention)
_TF32 = _SharedSwitch(_tf32_off)
_THREADS = _SharedSwitch(_threads_left_free)


def fair_threads() -> ContextManager[None]:
    """For a whole call: no more intra-op threads than CPUs free of other processes' work
    (process-wide, shared by overlapping calls like the switches above)."""
    return _THREADS()


@contextlib.contextmanager
def no_autocast() -> Iterator[None]:
    """How every forward of a call runs: autocast off (the kernel is the model's in its
    parameters' dtype), attention through the math backend of scaled_dot_product_attention and
    the nested-tensor fast path of nn.TransformerEncoder / nn.MultiheadAttention off (the fused
    kernels have no batching rules, which makes batched reverse passes and per-sample gradients
    fall back to slow loops; the math path computes the same function).

    Autocast is per thread; the attention switches are process-wide and shared by overlapping
    calls (saved by the first to enter, restored by the last to leave).
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        stack.enter_context(_ATTENTION())
        yield


@contextlib.contextmanager
def exact_matmul() -> Iterator[None]:
    """TF32 off for CUDA matmuls and convolutions inside the block (checks compare values).

    The switch is process-wide: while any call is inside this block, other threads' matmuls
    run without TF32 too; the user's setting comes back when the last such block ends.
    """
    with _TF32():
        yield


class ModelState:
    """Holds the locks of a model's parts and restores what a call must leave as it found it.

    Every submodule, parameter and buffer is locked: hooks, probe forwards and torch.func's
    parameter swaps act on them, so two calls on models that share any of them (e.g. wrappers
    around one backbone) run one after the other, while calls on disjoint models run
    concurrently. The modules' locks are taken at once, then (with the registrations read under
    them) the tensors' at once; only a call that has all it needs holds tensors, so calls never
    deadlock each other. A call nested in a forward on the same thread re-enters what its thread holds.

    Restored: every module's registered parameters and buffers (a forward that reassigns
    ``self.n = ...``), the values of parameters and buffers changed in place (e.g. by
    ``nn.Embedding(max_norm=...)``; untouched ones keep their version counter), each
    parameter's ``grad`` and ``requires_grad``, and every ``training`` flag. Comparing values
    costs one copy of the parameters and buffers, held for the call.
    """

    def __init__(self, model: nn.Module) -> None:
        modules = list(model.modules())
        _acquire(modules)  # first: another call may have parameters swapped out right now
        try:
            registered = [(m, dict(m._parameters.items()), dict(m._buffers.items()))
                          for m in modules]
            tensors = list({id(t): t for _, params, buffers in registered
                            for t in (*params.values(), *buffers.values())
                            if t is not None}.values())
            _acquire(tensors)
        except BaseException:
            _release(modules)
            raise
        self._held = modules + tensors
        try:
            self.registered = registered
            self.training = [(m, m.training) for m in modules]
            params = [t for t in tensors if isinstance(t, nn.Parameter)]
            self.grads = [(p, p.grad, p.requires_grad) for p in params]
            self.values = [(t, t.detach().clone()) for t in tensors if _has_data(t)]
        except BaseException:
            _release(self._held)
            raise

    def restore(self) -> None:
        """Puts everything back and releases the locks (once, even if restoring fails)."""
        try:
            for module, params, buffers in self.registered:
                _restore_registered(module, "_parameters", params)
                _restore_registered(module, "_buffers", buffers)
            for module, flag in self.training:
                if module.training != flag:
                    module.training = flag
            for param, grad, requires_grad in self.grads:
                if param.grad is not grad:
                    param.grad = grad
                if param.requires_grad != requires_grad:
                    param.requires_grad_(requires_grad)
            with torch.no_grad():
                for tensor, saved in self.values:
                    if tensor.shape != saved.shape or tensor.dtype != saved.dtype:
                        tensor.data = saved  # the forward swapped its .data
                    elif not torch.equal(_bits(tensor), _bits(saved)):  # untouched: same version
                        tensor.copy_(saved)
        finally:
            _release(self._held)


@contextlib.contextmanager
def registrations_kept(model: nn.Module) -> Iterator[None]:
    """Puts back, on leaving, every module's registered parameters and buffers: a forward run
    under ``torch.func.vmap`` that reassigns a buffer (``self.seen = torch.cat(...)``) would
    otherwise leave a batched tensor in the model for the next forward."""
    saved = [(m, dict(m._parameters.items()), dict(m._buffers.items()))
             for m in model.modules()]
    try:
        yield
    finally:
        for module, params, buffers in saved:
            _restore_registered(module, "_parameters", params)
            _restore_registered(module, "_buffers", buffers)


# Internal helpers

# id(object) -> [object, owning thread, depth]: modules and tensors some call holds now.
_HELD: dict[int, list] = {}
_HELD_CHANGED = threading.Condition(threading.Lock())


def _acquire(objects: list) -> None:
    """Waits until no other thread holds any of ``objects``, then holds them all at once."""
    me = threading.get_ident()

    def free() -> bool:
        return all(_HELD.get(id(o), (None, me))[1] == me for o in objects)

    with _HELD_CHANGED:
        _HELD_CHANGED.wait_for(free)
        for o in objects:
            _HELD.setdefault(id(o), [o, me, 0])[2] += 1


def _release(objects: list) -> None:
    with _HELD_CHANGED:
        for o in objects:
            entry = _HELD[id(o)]
            entry[2] -= 1
            if entry[2] == 0:
                del _HELD[id(o)]
        _HELD_CHANGED.notify_all()


def _restore_registered(module: nn.Module, slot: str, saved: dict) -> None:
    """Puts back the tensors registered in ``module._parameters`` or ``_buffers``."""
    now = getattr(module, slot)
    if isinstance(now, dict):
        if now.keys() != saved.keys() or any(now[k] is not v for k, v in saved.items()):
            now.clear()
            now.update(saved)
        return
    # A scripted module: its attributes are fixed, only their tensors can be reassigned.
    current = dict(now.items())
    for name, tensor in saved.items():
        if current.get(name) is not tensor:
            setattr(module, name, tensor)


def _has_data(t: Tensor) -> bool:
    return t.layout == torch.strided and t.device.type != "meta"


def _bits(t: Tensor) -> Tensor:
    """The tensor's bits as integers, so NaNs and signed zeros compare exactly."""
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.is_floating_point():
        return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32,
                       8: torch.int64}[t.element_size()])
    return t
