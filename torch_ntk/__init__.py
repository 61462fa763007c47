"""torch_ntk: exact Neural Tangent Kernels of PyTorch models, and their infinite-width limit."""
from torch_ntk import native, predict
from torch_ntk._analytic import analytic_ntk
from torch_ntk._empirical import empirical_ntk
from torch_ntk._linearize import linearize
from torch_ntk._ntkmlp import NTKLinear, NTKMLP

__all__ = ["empirical_ntk", "analytic_ntk", "NTKMLP", "NTKLinear", "linearize", "predict",
           "native"]
__version__ = "0.1.0"
