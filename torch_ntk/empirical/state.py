"""What a call must leave as it found it, and the settings every forward of a call runs under.

``ModelState`` holds a model's lock and restores its registered tensors, buffers and training
flags; ``no_autocast`` and ``exact_matmul`` set the process-wide switches of one call.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


@contextlib.contextmanager
def no_autocast():
    """How every forward of a call runs: autocast off (the kernel is the model's in its
    parameters' dtype) and attention through the math backend of scaled_dot_product_attention
    (the fused CPU/GPU kernels have no batching rules, which makes batched reverse passes and
    per-sample gradients fall back to slow loops; the math backend computes the same function)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        yield


@contextlib.contextmanager
def exact_matmul() -> Iterator[None]:
    """TF32 off for CUDA matmuls and convolutions inside the block (checks compare values)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


class ModelState:
    """Holds the model's lock and restores what a call must leave as it found it.

    Calls on one model are serialised (hooks, probe forwards and torch.func's parameter swaps
    act on the shared module); calls on different models run concurrently. Restored: every
    module's registered parameters and buffers (a forward that reassigns ``self.n = ...``), the
    buffers' values and every ``training`` flag.
    """

    def __init__(self, model: nn.Module) -> None:
        with _LOCKS_GUARD:
            self.lock = _LOCKS.setdefault(model, threading.RLock())
        self.lock.acquire()
        try:
            modules = list(model.modules())
            self.registered = [(m, dict(m._parameters), dict(m._buffers)) for m in modules]
            self.training = [(m, m.training) for m in modules]
            self.values = [(b, b.detach().clone()) for b in model.buffers()]
        except BaseException:
            self.lock.release()
            raise

    def restore(self) -> None:
        try:
            for module, params, buffers in self.registered:
                for now, saved in ((module._parameters, params), (module._buffers, buffers)):
                    if now.keys() != saved.keys() or any(now[k] is not v for k, v in saved.items()):
                        now.clear()
                        now.update(saved)
            for module, flag in self.training:
                module.training = flag
            with torch.no_grad():
                for buffer, saved in self.values:
                    if not torch.equal(buffer, saved):  # an untouched buffer keeps its version
                        buffer.copy_(saved)
        finally:
            self.lock.release()
