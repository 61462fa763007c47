"""Training-dynamics experiments after Jacot et al. 2018, §6 (``python -m torch_ntk demo``).

A small toolkit (full-batch gradient descent on the MSE loss that records the empirical
NTK, outputs and loss at chosen steps) and the demo built on it, which reproduces the
paper's three claims for a depth-4 ReLU network in the NTK parameterisation, with inputs
on the unit circle ``x = (cos γ, sin γ)`` (https://arxiv.org/abs/1806.07572, Figs. 1-2):

1. At initialisation the empirical NTK converges to the deterministic analytic limit
   Θ∞ as the width grows, with relative error ∝ width^(-1/2).
2. During training it moves less and less: ‖Θ_T − Θ_0‖ / ‖Θ_0‖ ∝ width^(-1/2).
3. The trained network follows kernel gradient descent with Θ∞: its outputs at time T
   approach ``predict.gradient_descent_mse(Θ∞, ...)`` at the same time T.

Only the public torch_ntk API is used here, as a user would.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

import torch_ntk
from torch_ntk.predict import gradient_descent_mse

__all__ = ["TrainingRecord", "train_mse", "unit_circle", "loglog_slope", "add_demo_arguments",
           "run_demo"]

# Training set of the demo: 4 points on the circle and their targets (as in the paper's Fig. 2).
TRAIN_GAMMA = (-2.5, -1.0, 0.5, 2.0)
# Defaults per kind of run: widths, seeds, circle points, steps, learning rate. All train for
# the same time lr · steps = 50 (10 for --quick); smaller steps on a GPU lower the floor set
# by comparing discrete steps with continuous time (see _demo_data).
_SIZES = {
    "quick": dict(widths=[16, 64], seeds=2, circle_points=16, steps=20, lr=0.5),
    "cpu": dict(widths=[64, 128, 256, 512, 1024, 2048, 4096], seeds=4, circle_points=64,
                steps=100, lr=0.5),
    "cuda": dict(widths=[64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768], seeds=10,
                 circle_points=128, steps=400, lr=0.125),
}
_PERCENTILES = (10.0, 50.0, 90.0)


@dataclass
class TrainingRecord:
    """What ``train_mse`` recorded; tensors are on the CPU.

    Attributes:
        steps (list[int]): the R recorded steps, ascending.
        loss (Tensor[S + 1]): loss before each of the S updates and after the last one.
        fx_train (Tensor[R, N, *out_shape]): outputs on the training inputs at each recorded step.
        fx_test (Tensor[R, M, *out_shape] or None): outputs on ``x_test``.
        ntk (Tensor[R, N_k, N_k, ...] or None): ``empirical_ntk(model, x_ntk, mode=ntk_mode)``.
        seconds (float): wall time of the whole run.
    """

    steps: list[int]
    loss: Tensor
    fx_train: Tensor
    fx_test: Tensor | None = None
    ntk: Tensor | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def train_mse(model: nn.Module, x_train: Tensor, y_train: Tensor, *, steps: int,
              learning_rate: float, record_steps: Iterable[int] | None = None,
              x_test: Tensor | None = None, x_ntk: Tensor | None = None,
              ntk_mode: str = "trace", ntk_method: str = "auto",
              callback: Callable[[int, float], None] | None = None) -> TrainingRecord:
    """Full-batch gradient descent on ``L = ||f(x_train) - y_train||² / (2 · y_train.numel())``.

    This is the discrete version of the dynamics ``torch_ntk.predict.gradient_descent_mse``
    solves: after S steps of size ``learning_rate``, compare with its ``t = S`` (same
    ``learning_rate``). The model is trained in place with ``torch.optim.SGD``, on the device
    of its parameters; inputs are moved there.

    Args:
        model (nn.Module): maps Tensor[N, *in_shape] to Tensor[N, *out_shape].
        x_train (Tensor[N, *in_shape]), y_train (Tensor[N, *out_shape]): training set.
        steps (int): number S of gradient-descent updates.
        learning_rate (float): step size.
        record_steps (iterable of int, optional): steps in ``[0, S]`` at which to record
            outputs and the NTK (before that step's update; S means after the last update).
            Defaults to ``(0, S)``.
        x_test (Tensor[M, *in_shape], optional): inputs whose outputs are recorded too.
        x_ntk (Tensor[N_k, *in_shape], optional): inputs of the recorded empirical NTK.
        ntk_mode (str), ntk_method (str): passed to ``torch_ntk.empirical_ntk``.
        callback (callable, optional): called as ``callback(step, loss)`` after each update.
    Returns:
        TrainingRecord: the recorded steps, losses, outputs and kernels.
    Raises:
        ValueError: ``steps`` < 0, a record step outside ``[0, steps]``, or ``y_train`` not of
            the model's output shape.
    Example:
        >>> net = torch_ntk.NTKMLP(2, 256, 3)
        >>> x, y = torch.randn(4, 2), torch.randn(4, 1)
        >>> rec = train_mse(net, x, y, steps=50, learning_rate=1.0, x_ntk=x)
        >>> rec.ntk.shape
        torch.Size([2, 4, 4])
    """
    if steps < 0:
        raise ValueError(f"train_mse: steps must be >= 0, got {steps}.")
    wanted = sorted(set(int(s) for s in (record_steps if record_steps is not None
                                        else (0, steps))))
    if wanted and (wanted[0] < 0 or wanted[-1] > steps):
        raise ValueError(f"train_mse: record_steps must lie in [0, {steps}], got {wanted}.")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    x_train, y_train = x_train.to(device), y_train.to(device=device, dtype=dtype)
    x_test = None if x_test is None else x_test.to(device)
    x_ntk = None if x_ntk is None else x_ntk.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=learning_rate)
    scale = 1.0 / (2 * y_train.numel())
    losses, f_train, f_test, kernels = [], [], [], []
    start = time.perf_counter()
    for step in range(steps + 1):
        record = step in wanted
        if record:  # before this step's forward pass, whose graph must stay intact
            if x_ntk is not None:
                kernels.append(torch_ntk.empirical_ntk(model, x_ntk, mode=ntk_mode,
                                                       method=ntk_method).cpu())
            if x_test is not None:
                with torch.no_grad():
                    f_test.append(model(x_test).cpu())
        optimizer.zero_grad(set_to_none=True)
        out = model(x_train)
        if out.shape != y_train.shape:
            raise ValueError(f"train_mse: the model maps x_train to shape {tuple(out.shape)} "
                             f"but y_train has shape {tuple(y_train.shape)}.")
        loss = (out - y_train).square().sum() * scale
        losses.append(loss.detach())
        if record:
            f_train.append(out.detach().cpu())
        if step == steps:
            break
        loss.backward()
        optimizer.step()
        if callback is not None:
            callback(step + 1, loss.item())
    optimizer.zero_grad(set_to_none=True)
    return TrainingRecord(
        steps=wanted, loss=torch.stack(losses).cpu(), fx_train=torch.stack(f_train),
        fx_test=torch.stack(f_test) if f_test else None,
        ntk=torch.stack(kernels) if kernels else None, seconds=time.perf_counter() - start)


def unit_circle(gamma: Tensor) -> Tensor:
    """Points ``(cos γ, sin γ)`` on the unit circle.

    Args:
        gamma (Tensor[N]): angles in radians.
    Returns:
        Tensor[N, 2]: the points, dtype of ``gamma``.
    """
    return torch.stack([torch.cos(gamma), torch.sin(gamma)], dim=-1)


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares fit ``log y = slope · log x + intercept``.

    Args:
        x (sequence of float), y (sequence of float): positive values, same length >= 2.
    Returns:
        tuple[float, float]: ``(slope, intercept)``.
    """
    lx, ly = np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float))
    slope, intercept = np.polyfit(lx, ly, 1)
    return float(slope), float(intercept)


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
    return parser


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the demo experiments, prints a summary table, writes results.json and PNG plots.

    For every width and seed, a depth-L ReLU ``NTKMLP`` (``w_std=1``, ``b_std=β``, one
    output) is trained by full-batch gradient descent on 4 points of the unit circle, and
    at t = 0 and t = T its empirical NTK and outputs on G points of the circle are compared
    with the analytic NTK Θ∞ and with ``predict.gradient_descent_mse`` (kernel gradient
    descent) started from the network's own initial outputs.

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
    start = time.perf_counter()
    cfg = _resolve_config(args)
    os.makedirs(cfg["out"], exist_ok=True)
    data = _demo_data(cfg)
    runs = []
    # Progress in percent of the estimated work, so that the time left is meaningful: a
    # step of a width-n network costs about n² + 1000 · n (matrix products + overhead).
    cost = {w: w * w + 1000 * w for w in cfg["widths"]}
    bar = _progress(sum(cost.values()) * cfg["seeds"] * cfg["steps"], cfg["no_progress"])
    try:
        for width in cfg["widths"]:
            for seed in range(cfg["seeds"]):
                bar.set_description(f"width {width} seed {seed}")
                runs.append(_run_one(width, seed, cfg, data,
                                     lambda s, l, c=cost[width]: bar.update(c)))
    finally:
        bar.close()
    results = _summarise(cfg, data, runs)
    results["plots"] = _plot_all(cfg, data, runs, results)
    results["wall_time_s"] = time.perf_counter() - start
    with open(os.path.join(cfg["out"], "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(_format_summary(results))
    print(f"\nwrote {os.path.join(cfg['out'], 'results.json')} and "
          f"{len(results['plots'])} plots in {results['wall_time_s']:.1f} s")
    return results


# Internal helpers


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


def _demo_data(cfg: dict[str, Any]) -> dict[str, Any]:
    """Inputs, targets and everything about the infinite-width limit (float64, CPU)."""
    f64 = torch.float64
    g = cfg["circle_points"]
    gamma = torch.arange(g, dtype=f64) * (2 * math.pi / g) - math.pi  # γ = 0 at index g / 2
    gamma_train = torch.tensor(TRAIN_GAMMA, dtype=f64)
    x_circle, x_train = unit_circle(gamma), unit_circle(gamma_train)
    y_train = (0.5 * torch.sin(2 * gamma_train)).unsqueeze(-1)  # (4, 1)
    x_all = torch.cat([x_train, x_circle])  # kernels are taken on train ∪ circle
    kw = dict(depth=cfg["depth"], activation=cfg["activation"], w_std=cfg["w_std"],
              b_std=cfg["b_std"])
    limit = torch_ntk.analytic_ntk(x_all, get=("nngp", "ntk"), **kw)
    ntk, nngp = limit.ntk, limit.nngp
    n = len(TRAIN_GAMMA)
    k_tt, k_ct = ntk[:n, :n], ntk[n:, :n]
    predict_fn = gradient_descent_mse(k_tt, y_train, learning_rate=cfg["lr"])

    # The limit's distribution at time T: f0 ~ GP(0, Σ) (NNGP), then kernel gradient descent.
    gen = torch.Generator().manual_seed(12345)
    jitter = 1e-10 * float(torch.diagonal(nngp).mean())
    chol = torch.linalg.cholesky(nngp + jitter * torch.eye(nngp.shape[0], dtype=f64))
    f0 = chol @ torch.randn(nngp.shape[0], 2000, generator=gen, dtype=f64)  # (n + g, 2000)
    f0 = f0.T.unsqueeze(-1)  # (2000, n + g, 1)
    limit_circle = torch.stack([predict_fn(float(cfg["steps"]), a[:n], a[n:], k_ct)[1]
                                for a in f0])[..., 0]  # (2000, g)
    mean_circle = predict_fn(float(cfg["steps"]), 0.0, 0.0, k_ct)[1][:, 0]

    # Floor set by comparing discrete steps with continuous time: exact discrete-time kernel
    # gradient descent on the circle vs the continuous-time prediction, from f0 = 0.
    f_tr, f_c = torch.zeros(n, 1, dtype=f64), torch.zeros(g, 1, dtype=f64)
    rate = cfg["lr"] / y_train.numel()
    for _ in range(cfg["steps"]):
        r = f_tr - y_train
        f_tr, f_c = f_tr - rate * k_tt @ r, f_c - rate * k_ct @ r
    floor = float((f_c[:, 0] - mean_circle).square().mean().sqrt())
    return {
        "gamma": gamma, "gamma_train": gamma_train, "x_circle": x_circle, "x_train": x_train,
        "y_train": y_train, "x_all": x_all, "ntk": ntk, "nngp": nngp, "n_train": n,
        "predict_fn": predict_fn, "limit_circle": limit_circle, "mean_circle": mean_circle,
        "discretization_floor": floor, "x0_index": g // 2,
    }


def _run_one(width: int, seed: int, cfg: dict[str, Any], data: dict[str, Any],
             callback: Callable[[int, float], None]) -> dict[str, Any]:
    """Trains one network and measures it against the limit."""
    device, dtype = torch.device(cfg["device"]), getattr(torch, cfg["dtype"])
    torch.manual_seed(seed)
    with torch.device(device):
        model = torch_ntk.NTKMLP(2, width, cfg["depth"], 1, activation=cfg["activation"],
                                 w_std=cfg["w_std"], b_std=cfg["b_std"]).to(dtype)
    n = data["n_train"]
    rec = train_mse(model, data["x_train"].to(dtype), data["y_train"].to(dtype),
                    steps=cfg["steps"], learning_rate=cfg["lr"],
                    x_test=data["x_circle"].to(dtype), x_ntk=data["x_all"].to(dtype),
                    ntk_mode="trace", callback=callback)
    del model
    ntk0, ntk_t = rec.ntk[0].double(), rec.ntk[-1].double()  # (n + g, n + g), K = 1
    lim_c, emp0_c, empt_c = (k[n:, n:] for k in (data["ntk"], ntk0, ntk_t))
    f0_train, f0_circle = rec.fx_train[0].double(), rec.fx_test[0].double()
    f_net = rec.fx_test[-1].double()[:, 0]
    t_end = float(cfg["steps"])
    f_kernel = data["predict_fn"](t_end, f0_train, f0_circle, data["ntk"][n:, :n])[1][:, 0]
    lin_fn = gradient_descent_mse(ntk0[:n, :n], data["y_train"], learning_rate=cfg["lr"])
    f_lin = lin_fn(t_end, f0_train, f0_circle, ntk0[n:, :n])[1][:, 0]
    i0 = data["x0_index"]
    rms = lambda v: float(v.square().mean().sqrt())  # noqa: E731
    return {
        "width": width, "seed": seed,
        "init_rel_err": float(torch.linalg.norm(emp0_c - lim_c) / torch.linalg.norm(lim_c)),
        "drift": float(torch.linalg.norm(empt_c - emp0_c) / torch.linalg.norm(emp0_c)),
        "net_vs_kernel": rms(f_net - f_kernel),
        "net_vs_linearized": rms(f_net - f_lin),
        "loss_0": float(rec.loss[0]), "loss_T": float(rec.loss[-1]),
        "train_seconds": rec.seconds,
        "ntk_row_x0_t0": emp0_c[i0].tolist(), "ntk_row_x0_T": empt_c[i0].tolist(),
        "f_net_T": f_net.tolist(), "f_kernel_T": f_kernel.tolist(),
    }


def _summarise(cfg: dict[str, Any], data: dict[str, Any], runs: list[dict]) -> dict[str, Any]:
    metrics = ("init_rel_err", "drift", "net_vs_kernel", "net_vs_linearized", "loss_T")
    per_width = []
    for width in cfg["widths"]:
        rows = [r for r in runs if r["width"] == width]
        entry: dict[str, Any] = {"width": width, "seeds": len(rows)}
        for m in metrics:
            vals = np.array([r[m] for r in rows])
            entry[m] = {"mean": float(vals.mean()), "std": float(vals.std()),
                        "geomean": float(np.exp(np.log(np.maximum(vals, 1e-300)).mean()))}
        per_width.append(entry)
    slopes = {}
    if len(cfg["widths"]) >= 2:
        for m in metrics[:4]:
            slope, intercept = loglog_slope(cfg["widths"],
                                            [e[m]["geomean"] for e in per_width])
            slopes[m] = {"slope": slope, "intercept": intercept}
    config = {k: v for k, v in cfg.items() if k != "no_progress"}
    config.update({
        "train_gamma": list(TRAIN_GAMMA), "y_train": data["y_train"][:, 0].tolist(),
        "targets": "y = sin(2 γ) / 2", "x0": [1.0, 0.0], "loss": "||f - y||² / (2 · y.numel())",
        "torch": torch.__version__, "torch_ntk": torch_ntk.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "machine": _machine(cfg["device"]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    })
    return {
        "config": config,
        "circle_gamma": data["gamma"].tolist(),
        "limit": {
            "ntk_row_x0": data["ntk"][data["n_train"]:, data["n_train"]:][data["x0_index"]]
            .tolist(),
            "kernel_gd_mean_T": data["mean_circle"].tolist(),
            "kernel_gd_percentiles_T": {
                str(p): np.percentile(data["limit_circle"].numpy(), p, axis=0).tolist()
                for p in _PERCENTILES},
            "discretization_floor": data["discretization_floor"],
        },
        "runs": runs,
        "per_width": per_width,
        "slopes": slopes,
    }


def _machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def _format_summary(results: dict[str, Any]) -> str:
    cfg = results["config"]
    head = (f"NTK dynamics: depth {cfg['depth']} ReLU NTKMLP, β = {cfg['b_std']}, "
            f"{cfg['steps']} steps of lr {cfg['lr']}, {cfg['seeds']} seeds, "
            f"{cfg['circle_points']} circle points, {cfg['dtype']} on {cfg['device']}")
    cols = ("width", "|Θ0-Θ∞|/|Θ∞|", "|ΘT-Θ0|/|Θ0|", "net vs kernel", "net vs lin",
            "loss T")
    lines = [head, "", "  ".join(f"{c:>14s}" for c in cols)]
    for e in results["per_width"]:
        vals = [f"{e['width']:>14d}"]
        for m in ("init_rel_err", "drift", "net_vs_kernel", "net_vs_linearized", "loss_T"):
            vals.append(f"{e[m]['mean']:>8.2e}±{e[m]['std']:<5.0e}"[:14].rjust(14))
        lines.append("  ".join(vals))
    if results["slopes"]:
        lines.append("")
        names = {"init_rel_err": "NTK at init vs limit", "drift": "NTK drift during training",
                 "net_vs_kernel": "network vs kernel GD (Θ∞)",
                 "net_vs_linearized": "network vs linearized (Θ0)"}
        for m, s in results["slopes"].items():
            lines.append(f"log-log slope vs width, {names[m]:<28s} {s['slope']:+.2f}")
    lines.append(f"continuous- vs discrete-time floor of 'net vs kernel': "
                 f"{results['limit']['discretization_floor']:.1e}")
    return "\n".join(lines)


def _progress(total: int, disabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, disable=disabled, dynamic_ncols=True,
                bar_format="{desc}{percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")


def _plot_all(cfg: dict[str, Any], data: dict[str, Any], runs: list[dict],
              results: dict[str, Any]) -> list[str]:
    """Writes the three PNG figures; returns their paths."""
    from matplotlib.figure import Figure  # Agg canvas, no global backend switch

    narrow, wide = cfg["widths"][0], cfg["widths"][-1]
    gamma = np.append(data["gamma"].numpy(), math.pi)  # the circle closes: γ = π is γ = -π
    wrap = lambda v: np.append(np.asarray(v), np.asarray(v)[..., :1], axis=-1)  # noqa: E731
    paths = []

    # 1. Θ(x0, x(γ)) for a narrow and a wide network, t = 0 and t = T, with the limit.
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for width, color in ((narrow, "tab:orange"), (wide, "tab:blue")):
        for i, r in enumerate(r for r in runs if r["width"] == width):
            ax.plot(gamma, wrap(r["ntk_row_x0_t0"]), color=color, lw=0.9, alpha=0.8,
                    label=f"width {width}, init" if i == 0 else None)
            ax.plot(gamma, wrap(r["ntk_row_x0_T"]), color=color, lw=0.9, ls="--", alpha=0.8,
                    label=f"width {width}, after {cfg['steps']} steps" if i == 0 else None)
    ax.plot(gamma, wrap(results["limit"]["ntk_row_x0"]), color="black", lw=2, label="limit Θ∞")
    ax.set(xlabel="γ", ylabel="Θ(x0, x(γ))",
           title=f"NTK on the unit circle, x0 = (1, 0), depth {cfg['depth']} ReLU")
    ax.legend(fontsize=8)
    paths.append(_save(fig, cfg["out"], "ntk_circle.png"))

    # 2. Log-log: NTK error at init and drift during training vs width, fitted slopes.
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 3)
    panels = (("init_rel_err", "‖Θ0 − Θ∞‖ / ‖Θ∞‖", "NTK at init vs limit"),
              ("drift", "‖ΘT − Θ0‖ / ‖Θ0‖", "NTK drift during training"),
              ("net_vs_kernel", "RMS of f_net(T) − f_kernel(T)", "network vs kernel GD"))
    for ax, (metric, ylabel, title) in zip(axes, panels):
        _loglog_panel(ax, cfg, runs, results, metric)
        ax.set(xlabel="width", ylabel=ylabel, title=title)
        if metric == "net_vs_kernel":
            xs = cfg["widths"]
            ax.plot(xs, [e["net_vs_linearized"]["geomean"] for e in results["per_width"]],
                    "s-", color="tab:green", ms=4, label="vs linearized (Θ0)")
            ax.axhline(results["limit"]["discretization_floor"], color="gray", ls=":",
                       label="discrete-step floor")
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, cfg["out"], "ntk_convergence.png"))

    # 3. Outputs on the circle at time T: networks vs the limit's kernel gradient descent.
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    lim = {p: wrap(v) for p, v in results["limit"]["kernel_gd_percentiles_T"].items()}
    lo, mid, hi = (str(p) for p in _PERCENTILES)
    for ax, width in zip(axes, (narrow, wide)):
        f_net = wrap(np.array([r["f_net_T"] for r in runs if r["width"] == width]))
        ax.fill_between(gamma, lim[lo], lim[hi], color="gray", alpha=0.3,
                        label="limit, 10-90th pct")
        ax.plot(gamma, lim[mid], color="black", lw=1.5, label="limit, median")
        for i, f in enumerate(f_net):
            ax.plot(gamma, f, color="tab:blue", lw=0.8, alpha=0.7,
                    label="networks" if i == 0 else None)
        if len(f_net) >= 3:
            pct = np.percentile(f_net, _PERCENTILES, axis=0)
            ax.plot(gamma, pct[0], color="tab:red", lw=1, ls="--", label="networks, 10/90th pct")
            ax.plot(gamma, pct[2], color="tab:red", lw=1, ls="--")
        ax.scatter(data["gamma_train"].numpy(), data["y_train"][:, 0].numpy(), color="black",
                   marker="x", s=60, zorder=5, label="training points")
        ax.set(xlabel="γ", title=f"width {width}: {len(f_net)} networks, {cfg['steps']} steps "
                                 f"of lr {cfg['lr']:g}")
    axes[0].set_ylabel("f(x(γ))")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, cfg["out"], "net_vs_kernel.png"))
    return paths


def _loglog_panel(ax, cfg, runs, results, metric: str) -> None:
    widths = cfg["widths"]
    for r in runs:
        ax.plot(r["width"], r[metric], ".", color="tab:blue", alpha=0.35, ms=4)
    gm = [e[metric]["geomean"] for e in results["per_width"]]
    ax.plot(widths, gm, "o-", color="tab:blue", ms=4, label="geometric mean over seeds")
    if metric in results["slopes"]:
        s = results["slopes"][metric]
        xs = np.array([widths[0], widths[-1]], dtype=float)
        ax.plot(xs, np.exp(s["intercept"]) * xs ** s["slope"], color="tab:red", lw=1,
                label=f"fit: slope {s['slope']:+.2f}")
        for ref, style in ((-0.5, "--"), (-1.0, ":")) if metric == "drift" else ((-0.5, "--"),):
            ax.plot(xs, gm[-1] * (xs / widths[-1]) ** ref, color="gray", lw=1, ls=style,
                    label=f"slope {ref:+g}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")


def _save(fig, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110)
    return path
