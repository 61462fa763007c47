"""Kernels computed by every rank of a ``torch.distributed`` process group together, kept in
memory or written into a shared ``.npy`` file, resumable. The public functions are
``empirical_ntk`` and ``analytic_ntk``; the modules (api, comm, fingerprint, store) are private.
"""
from torch_ntk.distributed.api import analytic_ntk, empirical_ntk

__all__ = ["empirical_ntk", "analytic_ntk"]
