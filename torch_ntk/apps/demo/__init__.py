"""``python -m torch_ntk demo``: the experiments of Jacot et al. §6 (``cli``, ``circle``,
``pca``, ``cnn``, ``plots``, ``report``)."""
