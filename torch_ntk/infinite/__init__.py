"""The infinite-width limit: ``analytic`` (``analytic_ntk``, for fully-connected networks and for
modules built from NTK layers), ``program`` and ``rules/`` (the network as a graph of per-layer
rules), ``engine`` (tiles of input pairs), ``ntkmlp`` and ``layers`` (the NTK-parameterised
modules), ``monte_carlo`` (averages of empirical kernels). Private modules; the public names
are re-exported by ``torch_ntk``.
"""
from torch_ntk.infinite.analytic import analytic_ntk
from torch_ntk.infinite.layers import Erf, NTKConv1d, NTKConv2d
from torch_ntk.infinite.monte_carlo import monte_carlo_ntk
from torch_ntk.infinite.ntkmlp import NTKLinear, NTKMLP

__all__ = ["analytic_ntk", "monte_carlo_ntk", "NTKLinear", "NTKMLP", "NTKConv1d", "NTKConv2d",
           "Erf"]
