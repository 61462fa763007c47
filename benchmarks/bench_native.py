"""Native gram_sum op vs its pure-torch twin on the MLP factors (and, on GPU, a same-FLOP GEMM).

Usage: python benchmarks/bench_native.py [--device cuda] [--sizes 1024 8192] [--json out.json]
(the implementation lives in ``torch_ntk.apps.bench.gram``; ``python -m torch_ntk bench`` runs
it too).
"""
from torch_ntk.apps.bench.gram import main, run  # noqa: F401  (run: for importing scripts)

if __name__ == "__main__":
    main()
