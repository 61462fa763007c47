"""The empirical NTK of any module: ``api`` (the public function: validation, tiling, ``out``),
``checks`` (user-input checks), ``structured`` (the layer-factorised engine), ``jacobian`` (the
torch.func reference). Private modules; ``empirical_ntk`` is re-exported by ``torch_ntk``.
"""
from torch_ntk.empirical.api import empirical_ntk

__all__ = ["empirical_ntk"]
