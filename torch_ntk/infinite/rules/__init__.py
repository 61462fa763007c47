"""Infinite-width rules, one file per layer family: ``affine`` (dense, convolutions),
``activations`` (closed forms and the Hermite expansion), ``pooling``, ``norm``
(LayerNorm), ``structure`` (input, identity, scaling, flattening, sums); ``registry`` maps
modules and functions to them. ``base`` holds what they share."""
