"""The only door to the compiled core ``torch_ntk._C``; records why it is missing."""
from __future__ import annotations

import os

try:
    from torch_ntk import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
    LOAD_ERROR: str | None = None
except (ImportError, OSError) as exc:
    _C, LOAD_ERROR = None, f"{type(exc).__name__}: {exc}"


def has_kernel(device_type: str) -> bool:
    """True when the native op is compiled for ``device_type`` and not disabled."""
    return False
