"""Public view of the compiled core: what was built and what will run."""
from __future__ import annotations

import os

from torch_ntk import _ops

__all__ = ["info"]


def info() -> dict:
    """What the native core provides in this installation.

    Returns:
        dict: ``"cpu"`` (bool) the C++ kernel is used for CPU tensors; ``"cuda"`` (bool) the
        CUDA kernel is compiled into this build; ``"cuda_arch"`` (list of str, e.g.
        ``["8.0", "9.0"]``) the compute capabilities it was compiled for; ``"cuda_version"``
        (int, -1 without CUDA); ``"disabled"`` (bool) ``TORCH_NTK_DISABLE_NATIVE=1`` is set;
        ``"load_error"`` (str or None) why ``torch_ntk._C`` failed to load.
        When a part is missing the pure-torch path is used and results are the same.

    Example:
        >>> sorted(torch_ntk.native.info())[:3]
        ['cpu', 'cuda', 'cuda_arch']
    """
    cuda_version = _ops.cuda_version()
    return {
        "cpu": _ops.has_kernel("cpu"),
        "cuda": _ops.has_kernel("cuda"),
        "cuda_arch": [f"{a // 10}.{a % 10}" for a in _ops.cuda_arch()],
        "cuda_version": cuda_version,
        "disabled": os.environ.get("TORCH_NTK_DISABLE_NATIVE") == "1",
        "load_error": _ops.LOAD_ERROR,
    }
