"""Kernel gradient descent and Gaussian-process inference (implemented in
``torch_ntk.dynamics.predict``)."""
from torch_ntk.dynamics.predict import *  # noqa: F401,F403
from torch_ntk.dynamics.predict import __all__  # noqa: F401
