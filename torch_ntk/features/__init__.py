"""Beyond the N×N kernel: random features of the empirical NTK (``ntk_features``)."""
from torch_ntk.features.api import ntk_features

__all__ = ["ntk_features"]
