"""Kernel principal components of handwritten digits and the speed of training along them.

Jacot et al. 2018 (https://arxiv.org/abs/1806.07572, §6.3, Fig. 3): in the infinite-width
limit, gradient descent on the MSE loss moves the outputs along each eigenvector v_i of the
NTK Gram matrix Θ∞(X, X) independently, at a rate set by its eigenvalue λ_i. With this
library's loss ``||f - y||² / (2 N)`` (one output), a step of size ``lr`` changes the
training outputs by ``-lr / N · Θ (f - y)``, so the component ``a_t = v_iᵀ (f_t - f*)``
follows

    a_{t+1} = (1 - lr · λ_i / N) · a_t,   i.e. a_t = a_0 · exp(-r t),
    r = -log(1 - lr · λ_i / N) per step

(→ lr · λ_i / N, the continuous-time rate, as lr → 0).

The experiment takes N digits of scikit-learn's bundled 8×8 digits (no download), centres
them (minus the mean image of the whole set) and scales each to norm ``sqrt(64)`` so that
``x·x / n0 = 1``; computes the kernel principal components of the limiting NTK of the demo's
depth-L ReLU network (β = ``b_std``); trains networks of several widths towards the second
component, ``f* = sqrt(N) · v_2``, and fits the rate of decay of ``a_t`` per width.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

import torch_ntk
from torch_ntk.apps.machine import run_record
from torch_ntk.dynamics.training import train_mse

# Defaults per kind of run. The learning rate is chosen from the spectrum (lr · λ1 / N =
# STEP_FRACTION, well inside the stable range < 2) unless --lr is given.
SIZES = {
    "quick": dict(points=96, widths=[64, 512], steps=12, seeds=1),
    "cpu": dict(points=512, widths=[64, 256, 1024, 4096], steps=24, seeds=1),
    "cuda": dict(points=512, widths=[64, 256, 1024, 4096, 16384], steps=24, seeds=2),
}
STEP_FRACTION = 0.5
COMPONENT = 2  # the paper trains towards the second principal component
N_EIGENVALUES = 10


def load_digits_inputs(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """N digits of scikit-learn's 8×8 set, centred and scaled to ``||x||² = n0 = 64``.

    Args:
        n (int): number of digits (at most 1797), a fixed random subset.
        seed (int): seed of the subset.
    Returns:
        tuple[Tensor[N, 64], Tensor[N]]: inputs (float64) and labels (int64).
    Raises:
        RuntimeError: scikit-learn is missing (names the ``demo`` extra).
        ValueError: ``n`` out of range.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise RuntimeError("demo --experiment pca: needs scikit-learn for its bundled digits. "
                           "Install the demo extra: pip install 'torch_ntk[demo]'.") from exc
    digits = load_digits()
    images = torch.tensor(digits.data, dtype=torch.float64)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    if not 2 <= n <= images.shape[0]:
        raise ValueError(f"demo: --pca-points must lie in [2, {images.shape[0]}], got {n}.")
    subset = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    x = images[subset] - images.mean(0)
    x = x / x.norm(dim=1, keepdim=True) * math.sqrt(x.shape[1])
    return x, labels[subset]


def kernel_pca(cfg: dict[str, Any]) -> dict[str, Any]:
    """Inputs, Θ∞ and its eigen-decomposition (descending), the target and predicted rates."""
    x, labels = load_digits_inputs(cfg["points"])
    n = x.shape[0]
    ntk = torch_ntk.analytic_ntk(x, depth=cfg["depth"], activation="relu", w_std=1.0,
                                 b_std=cfg["b_std"])
    evals, evecs = torch.linalg.eigh(ntk)
    evals, evecs = evals.flip(0), evecs.flip(1)
    lr = cfg["lr"] if cfg["lr"] is not None else STEP_FRACTION * n / float(evals[0])
    v = evecs[:, COMPONENT - 1]
    step = lr * float(evals[COMPONENT - 1]) / n
    if not 0 < step < 1:
        raise ValueError(f"demo: --lr {lr:g} gives lr · λ{COMPONENT} / N = {step:.3g}; the "
                         "component decays monotonically only for values in (0, 1). Lower "
                         "--lr.")
    return {
        "x": x, "labels": labels, "ntk": ntk, "evals": evals, "evecs": evecs, "lr": lr,
        "target": (math.sqrt(n) * v).unsqueeze(-1), "v": v,
        "coords": evecs[:, :3] * evals[:3].clamp_min(0).sqrt(),  # kernel PCA coordinates
        "rate_discrete": -math.log1p(-step), "rate_continuous": step,
    }


def run_width(width: int, seed: int, cfg: dict[str, Any], data: dict[str, Any],
              callback: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Trains one network towards ``f*`` and fits the decay rate of ``v_2ᵀ (f_t - f*)``."""
    device, dtype = torch.device(cfg["device"]), getattr(torch, cfg["dtype"])
    torch.manual_seed(seed)
    with torch.device(device):
        model = torch_ntk.NTKMLP(data["x"].shape[1], width, cfg["depth"], 1, activation="relu",
                                 w_std=1.0, b_std=cfg["b_std"]).to(dtype)
    rec = train_mse(model, data["x"].to(dtype), data["target"].to(dtype), steps=cfg["steps"],
                    learning_rate=data["lr"], record_steps=range(cfg["steps"] + 1),
                    callback=callback)
    del model
    residual = rec.fx_train.double()[..., 0] - data["target"][:, 0]  # (S + 1, N)
    comp = residual @ data["v"]  # (S + 1,)
    rate = fit_rate(comp)
    pred = data["rate_discrete"]
    return {
        "width": width, "seed": seed, "rate": rate,
        "rel_err_rate": abs(rate - pred) / pred,
        "rel_err_rate_continuous": abs(rate - data["rate_continuous"]) / data["rate_continuous"],
        "component": comp.tolist(), "loss_0": float(rec.loss[0]), "loss_T": float(rec.loss[-1]),
        "train_seconds": rec.seconds,
    }


def fit_rate(comp: Tensor) -> float:
    """Least-squares rate r of ``|a_t| ≈ |a_0| exp(-r t)`` over t = 0..S (nan if a_t hits 0).

    Args:
        comp (Tensor[S + 1]): the component a_t at steps 0..S.
    Returns:
        float: the fitted rate per step.
    """
    mag = comp.abs().numpy()
    if not np.all(mag > 0) or not np.all(np.isfinite(mag)):
        return float("nan")
    slope, _ = np.polyfit(np.arange(mag.shape[0], dtype=float), np.log(mag), 1)
    return float(-slope)


def summarise(cfg: dict[str, Any], data: dict[str, Any], runs: list[dict]) -> dict[str, Any]:
    """The content of results.json for the pca experiment."""
    per_width = []
    for width in cfg["widths"]:
        rows = [r for r in runs if r["width"] == width]
        rates = np.array([r["rate"] for r in rows])
        per_width.append({
            "width": width, "seeds": len(rows), "rate_mean": float(rates.mean()),
            "rate_std": float(rates.std()),
            "rel_err_rate": float(abs(rates.mean() - data["rate_discrete"])
                                  / data["rate_discrete"]),
            "rel_err_rate_continuous": float(abs(rates.mean() - data["rate_continuous"])
                                             / data["rate_continuous"]),
        })
    config = {k: v for k, v in cfg.items() if k != "no_progress"}
    config.update({
        "experiment": "pca", "lr": data["lr"], "component": COMPONENT,
        "inputs": "sklearn digits 8x8, minus the mean image, scaled to ||x||^2 = 64",
        "target": f"f* = sqrt(N) * v_{COMPONENT}", "loss": "||f - y||² / (2 · N)",
        **run_record(cfg["device"]),
    })
    n = data["x"].shape[0]
    return {
        "config": config,
        "eigenvalues": data["evals"][:N_EIGENVALUES].tolist(),
        "eigenvalues_over_n": (data["evals"][:N_EIGENVALUES] / n).tolist(),
        "predicted_rate_per_step": data["rate_discrete"],
        "predicted_rate_continuous": data["rate_continuous"],
        "runs": runs,
        "per_width": per_width,
    }


def format_summary(results: dict[str, Any]) -> str:
    """The printed table of the pca experiment."""
    cfg = results["config"]
    lam = ", ".join(f"{v:.3g}" for v in results["eigenvalues"])
    lines = [
        f"Kernel PCA of {cfg['points']} digits: depth {cfg['depth']} ReLU NTK, "
        f"β = {cfg['b_std']}, {cfg['steps']} steps of lr {cfg['lr']:.4g}, {cfg['dtype']} on "
        f"{cfg['device']}",
        f"λ1..λ{len(results['eigenvalues'])} of Θ∞(X, X): {lam}",
        f"predicted rate along v{cfg['component']}: {results['predicted_rate_per_step']:.5f} "
        f"per step (-log(1 - lr·λ/N)); lr·λ/N = {results['predicted_rate_continuous']:.5f}",
        "",
        f"{'width':>8s}  {'fitted rate':>12s}  {'rel. err':>9s}  {'vs lr·λ/N':>9s}",
    ]
    for e in results["per_width"]:
        lines.append(f"{e['width']:>8d}  {e['rate_mean']:>12.5f}  {e['rel_err_rate']:>9.2%}  "
                     f"{e['rel_err_rate_continuous']:>9.2%}")
    return "\n".join(lines)
