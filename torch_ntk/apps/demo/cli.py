"""``python -m torch_ntk demo``: options, defaults per device, the run loop and its outputs."""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import time
from typing import Any

import torch

from torch_ntk.apps.demo import circle, cnn, pca, plots, report

# Defaults per kind of run: widths, seeds, circle points, steps, learning rate. All train for
# the same time lr · steps = 50 (10 for --quick); smaller steps on a GPU lower the floor set
# by comparing discrete steps with continuous time (see circle.limit_data).
_SIZES = {
    "quick": dict(widths=[16, 64], seeds=2, circle_points=16, steps=20, lr=0.5),
    "cpu": dict(widths=[64, 128, 256, 512, 1024, 2048, 4096], seeds=4, circle_points=64,
                steps=100, lr=0.5),
    "cuda": dict(widths=[64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768], seeds=10,
                 circle_points=128, steps=400, lr=0.125),
}


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the options of ``python -m torch_ntk demo`` to ``parser``.

    Args:
        parser (argparse.ArgumentParser): the ``demo`` (sub)parser.
    Returns:
        argparse.ArgumentParser: the same parser.
    """
    cpu, gpu = _SIZES["cpu"], _SIZES["cuda"]
    both = lambda key: f"{_fmt(cpu[key])} on CPU, {_fmt(gpu[key])} on a GPU"  # noqa: E731
    parser.add_argument("--widths", type=int, nargs="+", default=None, metavar="W",
                        help=f"hidden widths to sweep (default: {both('widths')})")
    parser.add_argument("--depth", type=int, default=4,
                        help="number of affine layers L, as in the paper (default: 4)")
    parser.add_argument("--seeds", type=int, default=None,
                        help=f"random initialisations per width (default: {both('seeds')})")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"full-batch gradient-descent steps (default: {both('steps')})")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"learning rate; kernel predictions are taken at t = steps in "
                             f"units of it (default: {both('lr')})")
    parser.add_argument("--b-std", type=float, default=0.1,
                        help="bias scale β of the NTK parameterisation (default: 0.1)")
    parser.add_argument(
        "--circle-points", type=int, default=None, metavar="G",
        help=f"test points on the unit circle where kernels and outputs are compared "
             f"(default: {both('circle_points')})")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                        help="dtype of the networks (default: float32); the analytic kernels "
                             "and predictions are always float64")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, or auto = cuda when available (default: auto)")
    parser.add_argument("--out", default=None,
                        help="output folder for results.json and the PNG plots "
                             "(default: ./ntk_runs/<timestamp>)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny run (widths 16 and 64, 2 seeds, 20 steps, a few seconds) "
                             "to check the set-up; explicit options still override it")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--experiment", choices=["circle", "pca", "cnn", "all"], default="circle",
        help="circle: the NTK's convergence and kernel gradient descent on the unit circle; "
             "pca: kernel principal components of handwritten digits and the rate of training "
             "along the 2nd one (Jacot et al. Fig. 3); cnn: a convolutional network's NTK on "
             "digits against its infinite-width limit as the channels grow, and during "
             "training (Fig. 1 for a CNN); all: the three, in subfolders circle/, pca/ and "
             "cnn/ of --out (default: circle)")
    pc, pg, pq = pca.SIZES["cpu"], pca.SIZES["cuda"], pca.SIZES["quick"]
    parser.add_argument(
        "--pca-points", type=int, default=None, metavar="N",
        help=f"pca: number of digits (default: {pc['points']}, {pq['points']} with --quick); "
             f"its widths default to {_fmt(pc['widths'])} on CPU, {_fmt(pg['widths'])} on a "
             f"GPU, its steps to {pc['steps']}, its seeds to {pc['seeds']} on CPU and "
             f"{pg['seeds']} on a GPU, its lr to {pca.STEP_FRACTION} · N / λ1")
    cc, cg, cq = cnn.SIZES["cpu"], cnn.SIZES["cuda"], cnn.SIZES["quick"]
    parser.add_argument(
        "--cnn-channels", type=int, nargs="+", default=None, metavar="C",
        help=f"cnn: channel counts of the convolutions to sweep (default: {_fmt(cc['channels'])} "
             f"on CPU, {_fmt(cg['channels'])} on a GPU, {_fmt(cq['channels'])} with --quick); "
             f"--widths, --depth, --b-std and --dtype don't apply to it (its network is fixed, "
             f"without biases, float64)")
    parser.add_argument(
        "--cnn-points", type=int, default=None, metavar="N",
        help=f"cnn: number of digits the kernels are compared on and the networks trained on "
             f"(default: {cc['points']}, {cq['points']} with --quick); its seeds default to "
             f"{cc['seeds']} on CPU and {cg['seeds']} on a GPU ({cq['seeds']} with --quick), of "
             f"which the first {cc['train_seeds']} (GPU {cg['train_seeds']}) of the narrowest "
             f"and the widest networks are trained, its steps to {cc['steps']} "
             f"({cq['steps']} with --quick), its lr to {cnn.STEP_FRACTION} · N · K / λmax")
    return parser


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the demo experiments, prints a summary table, writes results.json and PNG plots.

    For every width and seed, a depth-L ReLU ``NTKMLP`` (``w_std=1``, ``b_std=β``, one
    output) is trained by full-batch gradient descent on 4 points of the unit circle, and
    at t = 0 and t = T its empirical NTK and outputs on G points of the circle are compared
    with the analytic NTK Θ∞ and with ``predict.gradient_descent_mse`` (kernel gradient
    descent) started from the network's own initial outputs. ``--experiment pca`` and
    ``--experiment cnn`` run the experiments of ``pca`` and ``cnn`` instead (``all``: the
    three, each in its subfolder of ``--out``; the result is then a dict of their results).

    Args:
        args (argparse.Namespace): parsed options of ``add_demo_arguments`` (``widths``,
            ``depth``, ``seeds``, ``steps``, ``lr``, ``b_std``, ``circle_points``, ``dtype``,
            ``device``, ``out``, ``quick``, ``no_progress``); missing ones take their defaults.
    Returns:
        dict: the content of results.json (configuration, per-run and per-width metrics,
        fitted log-log slopes, plot paths, wall time).
    Raises:
        ValueError: an option out of range (the message names it).
        RuntimeError: ``--device cuda`` without a usable GPU.
    """
    experiment = getattr(args, "experiment", "circle") or "circle"
    if experiment == "pca":
        return _run_pca(args)
    if experiment == "cnn":
        return _run_cnn(args)
    if experiment == "all":
        out = getattr(args, "out", None) or os.path.join(
            "ntk_runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
        return {"circle": _run_circle(_with(args, out=os.path.join(out, "circle"))),
                "pca": _run_pca(_with(args, out=os.path.join(out, "pca"))),
                "cnn": _run_cnn(_with(args, out=os.path.join(out, "cnn")))}
    if experiment != "circle":
        raise ValueError(f"demo: --experiment must be circle, pca, cnn or all, got "
                         f"{experiment!r}.")
    return _run_circle(args)


def _run_circle(args: argparse.Namespace) -> dict[str, Any]:
    """The circle experiments (see run_demo)."""
    require_extras("matplotlib", "tqdm")
    start = time.perf_counter()
    cfg = _resolve_config(args)
    os.makedirs(cfg["out"], exist_ok=True)
    data = circle.limit_data(cfg)
    runs = []
    # Progress in percent of the estimated work, so that the time left is meaningful: a
    # step of a width-n network costs about n² + 1000 · n (matrix products + overhead).
    cost = {w: w * w + 1000 * w for w in cfg["widths"]}
    bar = _progress(sum(cost.values()) * cfg["seeds"] * cfg["steps"], cfg["no_progress"])
    try:
        for width in cfg["widths"]:
            for seed in range(cfg["seeds"]):
                bar.set_description(f"width {width} seed {seed}")
                runs.append(circle.run_one(width, seed, cfg, data,
                                     lambda s, l, c=cost[width]: bar.update(c)))
    finally:
        bar.close()
    results = circle.summarise(cfg, data, runs)
    results["plots"] = plots.plot_all(cfg, data, runs, results)
    results["wall_time_s"] = time.perf_counter() - start
    with open(os.path.join(cfg["out"], "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(report.format_summary(results))
    print(f"\nwrote {os.path.join(cfg['out'], 'results.json')} and "
          f"{len(results['plots'])} plots in {results['wall_time_s']:.1f} s")
    return results



def require_extras(*modules: str) -> None:
    """Raises a RuntimeError naming the ``demo`` extra when one of ``modules`` is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(
            f"demo: needs {', '.join(missing)}, which the library itself doesn't. Install the "
            "demo extra: pip install 'torch_ntk[demo]' (or pip install -e '.[demo]' in a "
            "checkout).")


# Internal helpers


def _with(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def _run_pca(args: argparse.Namespace) -> dict[str, Any]:
    """The pca experiment: kernel PCA of digits and training along the 2nd component."""
    require_extras("matplotlib", "tqdm", "sklearn")
    start = time.perf_counter()
    cfg = _resolve_pca_config(args)
    os.makedirs(cfg["out"], exist_ok=True)
    data = pca.kernel_pca(cfg)
    cost = {w: w * w + 1000 * w for w in cfg["widths"]}
    bar = _progress(sum(cost.values()) * cfg["seeds"] * cfg["steps"], cfg["no_progress"])
    runs = []
    try:
        for width in cfg["widths"]:
            for seed in range(cfg["seeds"]):
                bar.set_description(f"pca: width {width} seed {seed}")
                runs.append(pca.run_width(width, seed, cfg, data,
                                          lambda s, l, c=cost[width]: bar.update(c)))
    finally:
        bar.close()
    results = pca.summarise(cfg, data, runs)
    results["plots"] = plots.plot_pca(cfg, data, results)
    results["wall_time_s"] = time.perf_counter() - start
    with open(os.path.join(cfg["out"], "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(pca.format_summary(results))
    print(f"\nwrote {os.path.join(cfg['out'], 'results.json')} and "
          f"{len(results['plots'])} plots in {results['wall_time_s']:.1f} s")
    return results


def _resolve_pca_config(args: argparse.Namespace) -> dict[str, Any]:
    """The shared options of _resolve_config, with the pca experiment's own sizes."""
    base = _resolve_config(args)
    get = lambda name: getattr(args, name, None)  # noqa: E731
    sizes = pca.SIZES["quick" if base["quick"] else
                      ("cuda" if base["device"].startswith("cuda") else "cpu")]
    cfg = {key: base[key] for key in ("depth", "b_std", "dtype", "device", "quick", "out",
                                      "no_progress")}
    cfg.update({
        "widths": sorted(set(get("widths") or sizes["widths"])),
        "seeds": get("seeds") or sizes["seeds"],
        "steps": get("steps") or sizes["steps"],
        "lr": get("lr"),
        "points": get("pca_points") or sizes["points"],
    })
    if not isinstance(cfg["points"], int) or cfg["points"] < 2:
        raise ValueError(f"demo: --pca-points must be an integer >= 2, got {cfg['points']!r}.")
    return cfg


def _run_cnn(args: argparse.Namespace) -> dict[str, Any]:
    """The cnn experiment: a CNN's empirical NTK vs its limit over channels, and training."""
    require_extras("matplotlib", "tqdm", "sklearn")
    start = time.perf_counter()
    cfg = _resolve_cnn_config(args)
    os.makedirs(cfg["out"], exist_ok=True)
    data = cnn.limit_data(cfg)
    train = {cfg["channels"][0], cfg["channels"][-1]}
    # Progress in units of one training step of each network (about C² + 500 · C).
    cost = {c: c * c + 500 * c for c in cfg["channels"]}
    jobs = [(c, seed, c in train and seed < cfg["train_seeds"])
            for c in cfg["channels"] for seed in range(cfg["seeds"])]
    total = sum(cost[c] * (cnn.NTK_UNITS + (cfg["steps"] + cnn.NTK_UNITS) * t)
                for c, _, t in jobs)
    bar = _progress(total, cfg["no_progress"])
    runs = []
    try:
        for c, seed, trained in jobs:
            bar.set_description(f"cnn: {c} channels seed {seed}{' (trained)' * trained}")
            runs.append(cnn.run_one(c, seed, cfg, data, trained,
                                    lambda units, w=cost[c]: bar.update(units * w)))
    finally:
        bar.close()
    results = cnn.summarise(cfg, data, runs)
    results["plots"] = plots.plot_cnn(cfg, results)
    results["wall_time_s"] = time.perf_counter() - start
    with open(os.path.join(cfg["out"], "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(cnn.format_summary(results))
    print(f"\nwrote {os.path.join(cfg['out'], 'results.json')} and "
          f"{len(results['plots'])} plots in {results['wall_time_s']:.1f} s")
    return results


def _resolve_cnn_config(args: argparse.Namespace) -> dict[str, Any]:
    """The shared options of _resolve_config, with the cnn experiment's own sizes."""
    base = _resolve_config(args)
    get = lambda name: getattr(args, name, None)  # noqa: E731
    sizes = cnn.SIZES["quick" if base["quick"] else
                      ("cuda" if base["device"].startswith("cuda") else "cpu")]
    cfg = {key: base[key] for key in ("device", "quick", "out", "no_progress")}
    cfg.update({
        "channels": sorted(set(get("cnn_channels") or sizes["channels"])),
        "seeds": get("seeds") or sizes["seeds"],
        "train_seeds": min(sizes["train_seeds"], get("seeds") or sizes["seeds"]),
        "steps": get("steps") or sizes["steps"],
        "lr": get("lr"),
        "points": get("cnn_points") or sizes["points"],
    })
    if any(not isinstance(c, int) or c < 1 for c in cfg["channels"]):
        raise ValueError(f"demo: --cnn-channels must be positive, got {cfg['channels']}.")
    if not isinstance(cfg["points"], int) or not 2 <= cfg["points"] <= 1797:
        raise ValueError(f"demo: --cnn-points must be an integer in [2, 1797], got "
                         f"{cfg['points']!r}.")
    return cfg


def _fmt(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """Fills defaults (depending on the device and --quick) and validates the options."""
    get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    device = str(get("device", "auto") or "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"demo: --device {device} was asked for but torch.cuda.is_available() "
                           "is False. Use --device cpu (or auto).")
    quick = bool(get("quick", False))
    kind = "quick" if quick else ("cuda" if device.startswith("cuda") else "cpu")
    sizes = _SIZES[kind]
    cfg = {
        "widths": sorted(set(get("widths") or sizes["widths"])),
        "seeds": get("seeds") or sizes["seeds"],
        "depth": get("depth", 4),
        "steps": get("steps") or sizes["steps"],
        "lr": get("lr") or sizes["lr"],
        "activation": "relu",
        "w_std": 1.0,
        "b_std": get("b_std", 0.1),
        "circle_points": get("circle_points") or sizes["circle_points"],
        "dtype": get("dtype", "float32") or "float32",
        "device": device,
        "quick": quick,
        "sizes_from": kind,
        "no_progress": bool(get("no_progress", False)),
    }
    for key, low in (("depth", 2), ("seeds", 1), ("steps", 1), ("circle_points", 4)):
        if not isinstance(cfg[key], int) or cfg[key] < low:
            raise ValueError(f"demo: --{key.replace('_', '-')} must be an integer >= {low}, "
                             f"got {cfg[key]!r}.")
    if any(w < 1 for w in cfg["widths"]):
        raise ValueError(f"demo: --widths must be positive, got {cfg['widths']}.")
    if not cfg["lr"] > 0 or cfg["b_std"] < 0:
        raise ValueError(f"demo: need --lr > 0 and --b-std >= 0, got {cfg['lr']} and "
                         f"{cfg['b_std']}.")
    cfg["circle_points"] += cfg["circle_points"] % 2  # even, so that γ = 0 is on the grid
    out = get("out") or os.path.join(
        "ntk_runs", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    cfg["out"] = os.path.abspath(out)
    return cfg




def _progress(total: int, disabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, disable=disabled, dynamic_ncols=True,
                bar_format="{desc}{percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")

