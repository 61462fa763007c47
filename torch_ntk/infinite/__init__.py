"""The infinite-width limit of fully-connected networks: ``analytic`` (NNGP/NTK recursions and
activations) and ``ntkmlp`` (the NTK-parameterised network). Private modules; the public names
are re-exported by ``torch_ntk``.
"""
from torch_ntk.infinite.analytic import analytic_ntk
from torch_ntk.infinite.ntkmlp import NTKLinear, NTKMLP

__all__ = ["analytic_ntk", "NTKLinear", "NTKMLP"]
