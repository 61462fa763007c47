"""The empirical NTK without its N×N matrix: random features whose inner products estimate it
(``ntk_features``) and the kernel as a matrix-free linear operator (``NTKOperator``)."""
from torch_ntk.implicit.features import ntk_features
from torch_ntk.implicit.operator import NTKOperator

__all__ = ["ntk_features", "NTKOperator"]
