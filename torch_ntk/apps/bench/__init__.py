"""``python -m torch_ntk bench``: methods side by side (``methods``) and the native Gram-sum
kernel against its pure-torch twin (``gram``)."""
