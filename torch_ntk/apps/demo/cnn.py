"""Convergence of a convolutional network's NTK to its infinite-width limit, on digits.

Jacot et al. 2018 (https://arxiv.org/abs/1806.07572, §6.1, Fig. 1) show for a fully-connected
network that the empirical NTK at initialisation tends to the deterministic limit Θ∞ as the
width grows, and that it moves less and less during training. The same holds for a
convolutional network as its channel count C grows (Arora et al. 2019, the CNTK); this
experiment measures it for the small network (float64, no biases, K = 10 outputs)::

    NTKConv2d(1, C, 3, padding="same"), ReLU, NTKConv2d(C, C, 3, padding="same"), ReLU,
    AvgPool2d(2), NTKConv2d(C, C, 3, padding="same"), ReLU, AdaptiveAvgPool2d(1), Flatten,
    NTKLinear(C, 10, w_std=1)

on N of scikit-learn's bundled 8×8 digits (no download; centred and scaled to ``||x||² = 64``
as in the pca experiment, as images (N, 1, 8, 8)):

1. At initialisation, for every C and seed: ``‖Θ_C / K − Θ∞‖_F / ‖Θ∞‖_F`` with
   ``Θ_C = empirical_ntk(model, x, mode="trace")`` (the trace over the K i.i.d. outputs) and
   ``Θ∞ = analytic_ntk(model, x)``; its mean ± std over seeds and the log-log slope of the
   per-C geometric mean against C (theory: −1/2).
2. The narrowest and the widest networks are trained by full-batch gradient descent on the
   MSE towards the one-hot labels of the same N digits (``lr · λ_max(Θ∞) / (N · K)`` =
   ``STEP_FRACTION`` unless ``--lr`` is given): the kernel of one digit x0 against 20 others,
   ``Θ(x0, x_j)``, at initialisation and after training, next to the limit, and how far the
   whole kernel moved, ``‖Θ_T − Θ_0‖_F / ‖Θ_0‖_F``.

``build`` also gives the two other architectures whose limits ``benchmarks/digits_regression.py``
compares with the fully-connected kernels: ``"flatten"`` (no pooling) and ``"myrtle"``.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

import torch_ntk
from torch_ntk.apps.demo.circle import loglog_slope
from torch_ntk.apps.demo.pca import load_digits_inputs
from torch_ntk.apps.machine import run_record
from torch_ntk.dynamics.training import train_mse

# Defaults per kind of run. The work grows like C² (the empirical NTK at C = 256 on 32 digits
# takes about 6 s on one CPU core, a training step about 0.2 s). The error of one seed is
# spread widely (the kernel is dominated by one eigenvalue, whose fluctuation is one scalar),
# hence 8 seeds for the fit.
SIZES = {
    "quick": dict(channels=[8, 32], seeds=2, points=12, steps=10, train_seeds=1),
    "cpu": dict(channels=[8, 16, 32, 64, 128, 256], seeds=8, points=32, steps=60,
                train_seeds=1),
    "cuda": dict(channels=[8, 16, 32, 64, 128, 256, 512, 1024], seeds=8, points=32,
                 steps=60, train_seeds=4),
}
OUTPUTS = 10          # one output per digit class
ROW_POINTS = 20       # digits x_j of the row Θ(x0, x_j) besides x0 itself
STEP_FRACTION = 0.5   # lr · λ_max(Θ∞) / (N · K); discrete steps are stable below 2
# empirical_ntk's method: the layer-factorised kernel, which "auto" also takes for this network
# (its convolutions on 8×8 maps leave the contraction little to save, but the Jacobian method
# forms their per-sample gradients ~1.8× slower on a CPU at C = 256); named so that the
# experiment's timing never depends on the cost model.
NTK_METHOD = "structured"
NTK_UNITS = 30        # progress units of one empirical NTK, relative to one training step
ARCHITECTURES = {
    "gap": "conv3-relu ×2, avgpool 2, conv3-relu, global average pool, dense",
    "flatten": "conv3-relu ×2, flatten, dense",
    "myrtle": "conv3-relu ×2, avgpool 2, conv3-relu, avgpool 2, conv3-relu, global average "
              "pool, dense",
}


def build(arch: str, channels: int, outputs: int = OUTPUTS, *, dtype=torch.float64,
          device=None) -> nn.Module:
    """An NTK-parameterised ReLU CNN on (N, 1, 8, 8) images, without biases.

    Args:
        arch (str): ``"gap"`` (the experiment's network), ``"flatten"`` (no pooling: the
            last feature map is flattened into the dense layer) or ``"myrtle"`` (after
            Shankar et al. 2020's Myrtle networks: every average pooling followed by a
            conv-relu, so a second pooling and a conv-relu on the 2×2 map before the global
            one; a pooling right before the global one would change nothing, the mean of
            window means being the global mean); see ``ARCHITECTURES``.
        channels (int): channels C of every convolution.
        outputs (int): outputs K of the dense layer.
        dtype, device: of the parameters.
    Returns:
        nn.Sequential: the network; ``analytic_ntk(model, x)`` is its limit as C → ∞.
    Raises:
        ValueError: an unknown ``arch``.
    """
    conv = lambda c_in: torch_ntk.NTKConv2d(c_in, channels, 3, padding="same")  # noqa: E731
    dense = lambda n_in: torch_ntk.NTKLinear(n_in, outputs, w_std=1.0)  # noqa: E731
    body = [conv(1), nn.ReLU(), conv(channels), nn.ReLU()]
    if arch == "gap":
        layers = body + [nn.AvgPool2d(2), conv(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), dense(channels)]
    elif arch == "flatten":
        layers = body + [nn.Flatten(), dense(channels * 64)]
    elif arch == "myrtle":
        layers = body + [nn.AvgPool2d(2), conv(channels), nn.ReLU(), nn.AvgPool2d(2),
                         conv(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         dense(channels)]
    else:
        raise ValueError(f"cnn.build: arch must be one of {', '.join(ARCHITECTURES)}, "
                         f"got {arch!r}.")
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


def load_images(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """N digits as images (N, 1, 8, 8), float64, prepared as ``pca.load_digits_inputs``."""
    if not isinstance(n, int) or not 2 <= n <= 1797:
        raise ValueError(f"demo: --cnn-points must be an integer in [2, 1797], got {n!r}.")
    x, labels = load_digits_inputs(n, seed)
    return x.reshape(n, 1, 8, 8), labels


def limit_data(cfg: dict[str, Any]) -> dict[str, Any]:
    """Digits, one-hot targets, Θ∞ on them (float64, CPU), the learning rate and the row."""
    x, labels = load_images(cfg["points"])
    n = x.shape[0]
    ntk = torch_ntk.analytic_ntk(build("gap", 1), x)
    lam_max = float(torch.linalg.eigvalsh(ntk)[-1])
    lr = cfg["lr"] if cfg["lr"] is not None else STEP_FRACTION * n * OUTPUTS / lam_max
    step = lr * lam_max / (n * OUTPUTS)
    if not 0 < step < 2:
        raise ValueError(f"demo: --lr {lr:g} gives lr · λ_max / (N · K) = {step:.3g} for the "
                         "cnn experiment; gradient descent is stable only below 2. Lower --lr.")
    # The row: x0 = the first digit, then ROW_POINTS others ordered by the limit Θ∞(x0, x_j).
    others = torch.arange(1, min(n, ROW_POINTS + 1))
    others = others[torch.argsort(ntk[0, others], descending=True)]
    row = torch.cat([torch.zeros(1, dtype=torch.int64), others])
    return {"x": x, "labels": labels,
            "y": torch.nn.functional.one_hot(labels, OUTPUTS).to(torch.float64),
            "ntk": ntk, "lam_max": lam_max, "lr": lr, "step_fraction": step, "row": row}


def run_one(channels: int, seed: int, cfg: dict[str, Any], data: dict[str, Any],
            train: bool, progress: Callable[[float], None] | None = None) -> dict[str, Any]:
    """One network: its NTK at initialisation against Θ∞; trained if ``train``.

    ``progress(units)`` is called after the kernel (``NTK_UNITS`` units) and after every
    training step (one unit).
    """
    device = torch.device(cfg["device"])
    torch.manual_seed(seed)
    model = build("gap", channels, device=device)
    x = data["x"].to(device)
    lim, row = data["ntk"], data["row"]
    ntk0 = torch_ntk.empirical_ntk(model, x, mode="trace",
                                   method=NTK_METHOD).cpu() / OUTPUTS
    if progress is not None:
        progress(NTK_UNITS)
    norm = lambda v: float(torch.linalg.norm(v))  # noqa: E731
    result: dict[str, Any] = {
        "channels": channels, "seed": seed, "trained": train,
        "init_rel_err": norm(ntk0 - lim) / norm(lim),
        "ntk_row_x0_t0": ntk0[0, row].tolist(),
    }
    if train:
        rec = train_mse(model, x, data["y"], steps=cfg["steps"], learning_rate=data["lr"],
                        callback=None if progress is None else lambda s, loss: progress(1))
        ntk_t = torch_ntk.empirical_ntk(model, x, mode="trace",
                                        method=NTK_METHOD).cpu() / OUTPUTS
        if progress is not None:
            progress(NTK_UNITS)
        result.update({
            "drift": norm(ntk_t - ntk0) / norm(ntk0),
            "drift_row": norm(ntk_t[0, row] - ntk0[0, row]) / norm(ntk0[0, row]),
            "final_rel_err": norm(ntk_t - lim) / norm(lim),
            "ntk_row_x0_T": ntk_t[0, row].tolist(),
            "loss_0": float(rec.loss[0]), "loss_T": float(rec.loss[-1]),
            "train_acc": float((rec.fx_train[-1].argmax(-1) == data["labels"]).double().mean()),
            "train_seconds": rec.seconds,
        })
    del model
    return result



def summarise(cfg: dict[str, Any], data: dict[str, Any], runs: list[dict]) -> dict[str, Any]:
    """The content of results.json for the cnn experiment."""
    per_channels = []
    for c in cfg["channels"]:
        rows = [r for r in runs if r["channels"] == c]
        errs = np.array([r["init_rel_err"] for r in rows])
        entry: dict[str, Any] = {
            "channels": c, "seeds": len(rows),
            "init_rel_err": {"mean": float(errs.mean()), "std": float(errs.std()),
                             "geomean": float(np.exp(np.log(np.maximum(errs, 1e-300)).mean()))}}
        trained = [r for r in rows if r["trained"]]
        if trained:
            entry["trained_seeds"] = len(trained)
            for m in ("drift", "drift_row", "final_rel_err", "loss_T", "train_acc"):
                vals = np.array([r[m] for r in trained])
                entry[m] = {"mean": float(vals.mean()), "std": float(vals.std())}
        per_channels.append(entry)
    slopes = {}
    if len(cfg["channels"]) >= 2:
        slope, intercept = loglog_slope(cfg["channels"],
                                        [e["init_rel_err"]["geomean"] for e in per_channels])
        slope_mean, _ = loglog_slope(cfg["channels"],
                                     [e["init_rel_err"]["mean"] for e in per_channels])
        slopes["init_rel_err"] = {"slope": slope, "intercept": intercept,
                                  "slope_of_means": slope_mean}
    config = {k: v for k, v in cfg.items() if k != "no_progress"}
    row = data["row"]
    config.update({
        "experiment": "cnn", "lr": data["lr"], "step_fraction": data["step_fraction"],
        "ntk_method": NTK_METHOD,
        "architecture": ARCHITECTURES["gap"] + f" ({OUTPUTS} outputs, w_std 1, no biases)",
        "dtype": "float64", "outputs": OUTPUTS,
        "inputs": "sklearn digits 8x8 as (N, 1, 8, 8), minus the mean image, scaled to "
                  "||x||^2 = 64",
        "targets": "one-hot labels", "loss": "||f - y||² / (2 · N · K)",
        "error": "||empirical_ntk(model, x, mode='trace') / K - analytic_ntk(model, x)||_F "
                 "/ ||analytic_ntk(model, x)||_F",
        **run_record(cfg["device"]),
    })
    return {
        "config": config,
        "labels": data["labels"].tolist(),
        "row_indices": row.tolist(),
        "row_labels": data["labels"][row].tolist(),
        "x0_image": data["x"][0, 0].tolist(),
        "limit": {"ntk_row_x0": data["ntk"][0, row].tolist(), "lambda_max": data["lam_max"],
                  "ntk_diagonal_mean": float(data["ntk"].diagonal().mean())},
        "runs": runs,
        "per_channels": per_channels,
        "slopes": slopes,
    }


def format_summary(results: dict[str, Any]) -> str:
    """The printed table of the cnn experiment."""
    cfg = results["config"]
    lines = [
        f"CNTK convergence on {cfg['points']} digits: {cfg['architecture']}, float64 on "
        f"{cfg['device']}, {cfg['seeds']} seeds; training: {cfg['steps']} steps of lr "
        f"{cfg['lr']:.4g} (lr·λmax/(N·K) = {cfg['step_fraction']:.3g}) towards one-hot labels",
        "",
        f"{'channels':>8s}  {'|Θ0-Θ∞|/|Θ∞| mean ± std':>24s}  {'|ΘT-Θ0|/|Θ0|':>13s}  "
        f"{'row x0 moved':>12s}  {'loss 0 → T':>17s}  {'train acc':>9s}",
    ]
    for e in results["per_channels"]:
        err = e["init_rel_err"]
        line = f"{e['channels']:>8d}  {err['mean']:>13.4f} ± {err['std']:<8.4f}"
        if "drift" in e:
            loss0 = np.mean([r["loss_0"] for r in results["runs"]
                             if r["channels"] == e["channels"] and r["trained"]])
            line += (f"  {e['drift']['mean']:>13.2%}  {e['drift_row']['mean']:>12.2%}  "
                     f"{loss0:>7.4f} → {e['loss_T']['mean']:<7.4f}  "
                     f"{e['train_acc']['mean']:>9.1%}")
        lines.append(line)
    if results["slopes"]:
        s = results["slopes"]["init_rel_err"]
        lines += ["", f"log-log slope vs channels, NTK at init vs limit: {s['slope']:+.2f} "
                      f"(of the geometric means; of the means {s['slope_of_means']:+.2f}; "
                      f"theory -0.50)"]
    trained = [e for e in results["per_channels"] if "drift" in e]
    if len(trained) >= 2:
        narrow, wide = trained[0], trained[-1]
        d_narrow, d_wide = narrow["drift"]["mean"], wide["drift"]["mean"]
        lines.append(f"kernel moved during training: {d_narrow:.1%} at {narrow['channels']} "
                     f"channels, {d_wide:.1%} at {wide['channels']} (ratio "
                     f"{d_narrow / d_wide:.1f}; sqrt of the channel ratio "
                     f"{(wide['channels'] / narrow['channels']) ** 0.5:.1f})")
    return "\n".join(lines)
