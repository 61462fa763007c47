"""Public view of the compiled core."""
from torch_ntk import _ops


def info() -> dict:
    return {"cpu": _ops.has_kernel("cpu"), "cuda": False, "cuda_arch": []}
