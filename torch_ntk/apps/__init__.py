"""Applications built on the public API (``python -m torch_ntk demo|bench``); the library never
imports them. They need the ``demo`` extra (matplotlib, tqdm)."""
