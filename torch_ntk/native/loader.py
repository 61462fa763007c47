"""The only door to the compiled core ``torch_ntk._C``: loads it once, records why it is missing."""
from __future__ import annotations

import torch

try:
    from torch_ntk import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
    LOAD_ERROR: str | None = None
except (ImportError, OSError) as exc:
    _C, LOAD_ERROR = None, f"{type(exc).__name__}: {exc}"


def cuda_version() -> int:
    """CUDA runtime version the kernels were built with (e.g. 13000); -1 without CUDA."""
    return -1 if _C is None else int(torch.ops.torch_ntk.cuda_version())


def cuda_arch() -> list[int]:
    """Compute capabilities compiled into the CUDA kernels (e.g. [80, 90])."""
    return [] if _C is None else [int(a) for a in torch.ops.torch_ntk.cuda_arch()]
