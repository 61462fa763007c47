"""The native core: loading ``torch_ntk._C``, its Meta kernels, the backend route, the Gram sum.

Public: ``info()``. The modules inside (``loader``, ``fake``, ``route``, ``gram``) are private.
"""
from torch_ntk.native import fake, loader, route  # noqa: F401  (fake registers Meta kernels)
from torch_ntk.native.route import info

__all__ = ["info"]
