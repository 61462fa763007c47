"""torch_ntk: exact Neural Tangent Kernels of PyTorch models, and their infinite-width limit."""
from torch_ntk import native, predict
from torch_ntk.dynamics import linearize
from torch_ntk.empirical import empirical_ntk
from torch_ntk.implicit import NTKOperator, ntk_features
from torch_ntk.infinite import (Erf, NTKConv1d, NTKConv2d, NTKLinear, NTKMLP, analytic_ntk,
                                monte_carlo_ntk)
from torch_ntk import distributed  # after the single-process functions it builds on

__all__ = ["empirical_ntk", "ntk_features", "NTKOperator", "analytic_ntk", "monte_carlo_ntk",
           "NTKMLP", "NTKLinear", "NTKConv1d", "NTKConv2d", "Erf",
           "linearize", "predict",
           "native", "distributed"]
__version__ = "0.1.0"
