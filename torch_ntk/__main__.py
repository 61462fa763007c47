"""``python -m torch_ntk demo|bench``: argument parsing only; the work lives in torch_ntk.apps."""
from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m torch_ntk",
        description="Neural tangent kernels for PyTorch models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="training-dynamics experiments in the spirit of Jacot et al. (2018) §6",
        description="NTK at initialisation vs its infinite-width limit, NTK drift during "
                    "training, and the trained network vs kernel regression, over widths and "
                    "seeds. Writes results.json and PNG plots under --out.")
    from torch_ntk.apps.demo import cli as demo_cli
    demo_cli.add_demo_arguments(demo)

    bench = commands.add_parser(
        "bench", help="benchmark table: NTK methods side by side",
        description="Times the empirical-NTK methods side by side on the MLP "
                    "64-512-512-512-10 (each run in its own process, peak RSS per method), "
                    "and the native Gram-sum kernel against its pure-torch twin.")
    bench.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024],
                       help="numbers of inputs N (default: 64 256 1024)")
    bench.add_argument("--modes", nargs="+", default=["full", "trace"],
                       choices=["full", "trace", "diagonal"], help="kernel modes")
    bench.add_argument("--methods", nargs="+", default=None,
                       help="subset of: structured structured-torch jacobian func-jacrev "
                            "func-ntk-vp (default: all)")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    bench.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    bench.add_argument("--no-kernel", action="store_true",
                       help="skip the native-vs-pure-torch Gram-sum kernel table")
    bench.add_argument("--json", default=None, help="write the results to this JSON file")

    args = parser.parse_args(argv)
    if args.command == "demo":
        demo_cli.run_demo(args)
        return 0
    return _bench_command(args)


def _bench_command(args: argparse.Namespace) -> int:
    from torch_ntk.apps.bench import methods as bench_methods
    methods = tuple(args.methods) if args.methods else bench_methods.METHODS
    result = bench_methods.run_suite(sizes=tuple(args.sizes), modes=tuple(args.modes), methods=methods,
                              device=args.device, repeats=args.repeats)
    print()
    print(bench_methods.format_table(result))
    if not args.no_kernel:
        from torch_ntk.apps.bench import gram as bench_gram
        print("\nGram-sum kernel on the MLP's factors (native vs pure torch"
              + (", and a same-FLOP cuBLAS GEMM):" if args.device == "cuda" else "):"))
        result["kernel"] = bench_gram.run(args.device, sizes=tuple(args.sizes),
                                           modes=tuple(args.modes), repeats=args.repeats)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
