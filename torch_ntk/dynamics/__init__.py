"""Training dynamics: ``predict`` (kernel gradient descent and Gaussian-process inference,
public as ``torch_ntk.predict``), ``linearize`` and ``training`` (gradient-descent loops that
record the NTK). Private modules; the public names are re-exported by ``torch_ntk``.
"""
from torch_ntk.dynamics.linearize import linearize

__all__ = ["linearize"]
