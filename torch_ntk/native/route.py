"""Which backend computes a Gram sum: the one place that decides, with the reasons.

- CPU: the native C++ kernel whenever it is compiled. It is at least as fast as the pure-torch
  composition (2.2× for the full kernel on a 2-core EPYC) and needs O(tile) extra memory instead
  of one ``N1·N2·K²`` temporary per layer (benchmarks/RESULTS.md).
- CUDA: the pure-torch composition (cuBLAS) while its temporaries (about three outputs) fit in
  an eighth of the device's memory, since it is 2-3× faster than the native kernel on an H200;
  the native kernel beyond that, where the composition would run out of memory.
- float16/bfloat16 kernels: the composition (the native kernels take float32 and float64).
- Pure torch everywhere when ``torch_ntk._C`` did not load, or ``TORCH_NTK_DISABLE_NATIVE=1``
  was set when torch_ntk was imported (read once; ``native_disabled()`` switches it off in a
  running process, e.g. to compare the two paths).

``calls`` counts which backend ran, per device type, so tests can check the route taken.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import os
from typing import Iterator

import torch

from torch_ntk.native import loader

calls: collections.Counter = collections.Counter()  # (backend, device type) -> Gram sums run

_disabled = os.environ.get("TORCH_NTK_DISABLE_NATIVE") == "1"
_TORCH_TEMPORARIES = 3     # outputs' worth of memory the composition allocates per layer
_CUDA_MEMORY_SHARE = 8     # the composition may use 1/8 of the device's memory
_NATIVE_DTYPES = (torch.float32, torch.float64)  # half precision runs the composition


def native_available(device_type: str) -> bool:
    """True when the native op is compiled for ``device_type`` and not switched off."""
    if _disabled or loader._C is None:
        return False
    return device_type == "cpu" or (device_type == "cuda" and loader.cuda_version() > 0)


def backend(out: torch.Tensor) -> str:
    """``"native"`` or ``"torch"`` for a Gram sum written into ``out`` (see the module doc)."""
    device = out.device
    if not native_available(device.type) or out.dtype not in _NATIVE_DTYPES:
        return "torch"
    if device.type == "cuda":
        need = _TORCH_TEMPORARIES * out.numel() * out.element_size()
        if need < _cuda_memory(device.index or 0) // _CUDA_MEMORY_SHARE:
            return "torch"
    return "native"


def is_disabled() -> bool:
    """True when the native kernels are switched off (environment or ``native_disabled``)."""
    return _disabled


def info() -> dict:
    """What the native core provides in this installation.

    Returns:
        dict: ``"cpu"`` (bool) the C++ kernel is used for CPU tensors; ``"cuda"`` (bool) the
        CUDA kernel is compiled into this build; ``"cuda_arch"`` (list of str, e.g.
        ``["8.0", "9.0"]``) the compute capabilities it was compiled for; ``"cuda_version"``
        (int, -1 without CUDA); ``"disabled"`` (bool) the native kernels are switched off
        (``TORCH_NTK_DISABLE_NATIVE=1``);
        ``"load_error"`` (str or None) why ``torch_ntk._C`` failed to load.
        When a part is missing the pure-torch path is used and results are the same.

    Example:
        >>> sorted(torch_ntk.native.info())[:3]
        ['cpu', 'cuda', 'cuda_arch']
    """
    return {
        "cpu": native_available("cpu"),
        "cuda": native_available("cuda"),
        "cuda_arch": [f"{a // 10}.{a % 10}" for a in loader.cuda_arch()],
        "cuda_version": loader.cuda_version(),
        "disabled": is_disabled(),
        "load_error": loader.LOAD_ERROR,
    }


@contextlib.contextmanager
def native_disabled() -> Iterator[None]:
    """Within the block every Gram sum runs in pure torch (not thread-safe: a test switch)."""
    global _disabled
    saved, _disabled = _disabled, True
    try:
        yield
    finally:
        _disabled = saved


# Internal helpers

@functools.lru_cache(maxsize=None)
def _cuda_memory(index: int) -> int:
    return torch.cuda.get_device_properties(index).total_memory
