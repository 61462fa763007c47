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
                    "and the native Gram-sum kernel against its pure-torch twin; with "
                    "--models, on a zoo of models instead (mode full, one table per model).")
    bench.add_argument("--models", nargs="+", default=None,
                       choices=["mlp", "cnn", "transformer", "transformer-30k", "resnet18",
                                "gru"],
                       help="model zoo run: auto/structured/jacobian/func-jacrev on these "
                            "models (default: the MLP suite only)")
    bench.add_argument("--sizes", type=int, nargs="+", default=None,
                       help="numbers of inputs N (default: 64 256 1024; with --models "
                            "32 128 per model, resnet18 8 16, transformer-30k 32 64)")
    bench.add_argument("--modes", nargs="+", default=None,
                       choices=["full", "trace", "diagonal"],
                       help="kernel modes (default: full trace; with --models full)")
    bench.add_argument("--methods", nargs="+", default=None,
                       choices=["auto", "structured", "structured-torch", "jacobian",
                                "func-jacrev", "func-ntk-vp"],
                       help="subset of methods (default: structured structured-torch jacobian "
                            "func-jacrev func-ntk-vp; with --models auto structured jacobian "
                            "func-jacrev)")
    bench.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    bench.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    bench.add_argument("--time-limit", type=float, default=240.0,
                       help="seconds per measurement (its own process) before it is reported "
                            "as timed out (default: 240)")
    bench.add_argument("--check-n", type=int, default=None,
                       help="inputs of the float64 agreement check before timing "
                            "(default: 8, resnet18 2)")
    bench.add_argument("--no-kernel", action="store_true",
                       help="skip the native-vs-pure-torch Gram-sum kernel table "
                            "(never run with --models)")
    bench.add_argument("--busy-cores", type=int, default=0,
                       help="keep this many cores busy with other processes while measuring "
                            "(a shared machine; default: 0)")
    bench.add_argument("--json", default=None, help="write the results to this JSON file")

    args = parser.parse_args(argv)
    if args.command == "demo":
        demo_cli.run_demo(args)
        return 0
    return _bench_command(args)


def _bench_command(args: argparse.Namespace) -> int:
    from torch_ntk.apps.bench import methods as bench_methods
    from torch_ntk.apps.bench.harness import busy_cores
    with busy_cores(max(0, args.busy_cores)):
        if args.models:
            result = _bench_zoo(args, bench_methods)
        else:
            result = _bench_mlp(args, bench_methods)
    result["busy_cores"] = max(0, args.busy_cores)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


def _bench_mlp(args: argparse.Namespace, bench_methods) -> dict:
    sizes = tuple(args.sizes or (64, 256, 1024))
    modes = tuple(args.modes or ("full", "trace"))
    result = bench_methods.run_suite(
        sizes=sizes, modes=modes, methods=tuple(args.methods or bench_methods.METHODS),
        device=args.device, repeats=args.repeats, time_limit_s=args.time_limit,
        check_n=args.check_n)
    print()
    print(bench_methods.format_table(result))
    if not args.no_kernel:
        from torch_ntk.apps.bench import gram as bench_gram
        print("\nGram-sum kernel on the MLP's factors (native vs pure torch"
              + (", and a same-FLOP cuBLAS GEMM):" if args.device == "cuda" else "):"))
        result["kernel"] = bench_gram.run(args.device, sizes=sizes, modes=modes,
                                           repeats=args.repeats)
    return result


def _bench_zoo(args: argparse.Namespace, bench_methods) -> dict:
    result = bench_methods.run_zoo(
        names=tuple(dict.fromkeys(args.models)), sizes=args.sizes,
        modes=tuple(args.modes or ("full",)),
        methods=tuple(args.methods or bench_methods.ZOO_METHODS), device=args.device,
        repeats=args.repeats, time_limit_s=args.time_limit, check_n=args.check_n)
    print()
    print(bench_methods.format_zoo(result))
    return result


if __name__ == "__main__":
    sys.exit(main())
