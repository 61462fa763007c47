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

Only the public torch_ntk API is used here, as a user would (plus the training loop of
``torch_ntk.dynamics.training``).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

import torch_ntk
from torch_ntk.apps.machine import run_record
from torch_ntk.dynamics.training import train_mse
from torch_ntk.predict import gradient_descent_mse, gradient_descent_mse_ensemble

# Training set of the demo: 4 points on the circle and their targets (as in the paper's Fig. 2).
TRAIN_GAMMA = (-2.5, -1.0, 0.5, 2.0)
PERCENTILES = (10.0, 50.0, 90.0)


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


def limit_data(cfg: dict[str, Any]) -> dict[str, Any]:
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

    # The limit's distribution at time T: f0 ~ GP(0, Σ) (NNGP), then kernel gradient descent
    # with Θ∞. It is Gaussian, with the exact mean and covariance of the infinite ensemble;
    # its percentiles are mean + z_p · sd with z_p the standard normal quantile.
    kernel_fn = functools.partial(torch_ntk.analytic_ntk, **kw)
    ensemble = gradient_descent_mse_ensemble(kernel_fn, x_train, y_train, learning_rate=cfg["lr"])
    limit_t = ensemble(float(cfg["steps"]), x_circle, "ntk", compute_cov=True)
    mean_circle = limit_t.mean[:, 0]
    sd_circle = limit_t.covariance.diagonal().clamp_min(0.0).sqrt()
    percentiles = {
        p: mean_circle + float(torch.special.ndtri(torch.tensor(p / 100, dtype=f64))) * sd_circle
        for p in PERCENTILES}

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
        "predict_fn": predict_fn, "percentiles_circle": percentiles, "sd_circle": sd_circle,
        "mean_circle": mean_circle,
        "discretization_floor": floor, "x0_index": g // 2,
    }


def run_one(width: int, seed: int, cfg: dict[str, Any], data: dict[str, Any],
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


def summarise(cfg: dict[str, Any], data: dict[str, Any], runs: list[dict]) -> dict[str, Any]:
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
        **run_record(cfg["device"]),
    })
    return {
        "config": config,
        "circle_gamma": data["gamma"].tolist(),
        "limit": {
            "ntk_row_x0": data["ntk"][data["n_train"]:, data["n_train"]:][data["x0_index"]]
            .tolist(),
            "kernel_gd_mean_T": data["mean_circle"].tolist(),
            "kernel_gd_percentiles_T": {
                str(p): v.tolist() for p, v in data["percentiles_circle"].items()},
            "kernel_gd_sd_T": data["sd_circle"].tolist(),
            "discretization_floor": data["discretization_floor"],
        },
        "runs": runs,
        "per_width": per_width,
        "slopes": slopes,
    }


