"""The demo's figures (matplotlib, Agg canvas: no global backend switch)."""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

PERCENTILES = (10.0, 50.0, 90.0)


def plot_all(cfg: dict[str, Any], data: dict[str, Any], runs: list[dict],
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
    lo, mid, hi = (str(p) for p in PERCENTILES)
    for ax, width in zip(axes, (narrow, wide)):
        f_net = wrap(np.array([r["f_net_T"] for r in runs if r["width"] == width]))
        ax.fill_between(gamma, lim[lo], lim[hi], color="gray", alpha=0.3,
                        label="limit, 10-90th pct")
        ax.plot(gamma, lim[mid], color="black", lw=1.5, label="limit, median")
        for i, f in enumerate(f_net):
            ax.plot(gamma, f, color="tab:blue", lw=0.8, alpha=0.7,
                    label="networks" if i == 0 else None)
        if len(f_net) >= 3:
            pct = np.percentile(f_net, PERCENTILES, axis=0)
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


def plot_pca(cfg: dict[str, Any], data: dict[str, Any], results: dict[str, Any]) -> list[str]:
    """The pca experiment's two figures (after Jacot et al. 2018, Fig. 3); returns their paths."""
    from matplotlib.figure import Figure  # Agg canvas, no global backend switch

    paths = []
    # 3a. Digits in the coordinates of the 2nd and 3rd kernel principal components.
    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.subplots()
    coords, labels = data["coords"].numpy(), data["labels"].numpy()
    points = ax.scatter(coords[:, 1], coords[:, 2], c=labels, cmap="tab10", s=12, vmin=-0.5,
                        vmax=9.5)
    fig.colorbar(points, ax=ax, ticks=range(10), label="digit")
    ax.set(xlabel="2nd component √λ2 · v2", ylabel="3rd component √λ3 · v3",
           title=f"Kernel PCA of {len(labels)} digits, depth {cfg['depth']} ReLU Θ∞")
    paths.append(_save(fig, cfg["out"], "pca_components.png"))

    # 3b. Component of f_t - f* along v2 against exp(-r t).
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    steps = np.arange(cfg["steps"] + 1)
    colors = ("tab:orange", "tab:green", "tab:purple", "tab:blue", "tab:red", "tab:brown",
              "tab:pink")
    for i, width in enumerate(cfg["widths"]):
        for j, r in enumerate(x for x in results["runs"] if x["width"] == width):
            comp = np.asarray(r["component"])
            ax.plot(steps, np.abs(comp / comp[0]), color=colors[i % len(colors)], lw=1,
                    alpha=0.8, label=f"width {width}: rate {r['rate']:.4f}" if j == 0 else None)
    rate = results["predicted_rate_per_step"]
    ax.plot(steps, np.exp(-rate * steps), color="black", lw=2, ls="--",
            label=f"exp(−r t), r = −log(1 − lr·λ2/N) = {rate:.4f}")
    ax.set_yscale("log")
    ax.set(xlabel="gradient-descent step t", ylabel="|v2ᵀ(f_t − f*)| / |v2ᵀ(f_0 − f*)|",
           title="Training along the 2nd kernel principal component")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, cfg["out"], "pca_rate.png"))
    return paths


def plot_cnn(cfg: dict[str, Any], results: dict[str, Any]) -> list[str]:
    """The cnn experiment's two figures (Jacot et al. 2018, Fig. 1, for a CNN); their paths."""
    from matplotlib.figure import Figure  # Agg canvas, no global backend switch

    paths = []
    channels = cfg["channels"]
    per = results["per_channels"]
    # 1. Log-log: NTK error at init vs channels, seeds, mean ± std, fit and the -1/2 slope.
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    for r in results["runs"]:
        ax.plot(r["channels"], r["init_rel_err"], ".", color="tab:blue", alpha=0.35, ms=5)
    mean = np.array([e["init_rel_err"]["mean"] for e in per])
    std = np.array([e["init_rel_err"]["std"] for e in per])
    gm = [e["init_rel_err"]["geomean"] for e in per]
    ax.errorbar(channels, mean, yerr=std, fmt="s", color="tab:green", ms=4, capsize=3,
                label="mean ± std over seeds")
    ax.plot(channels, gm, "o-", color="tab:blue", ms=4, label="geometric mean over seeds")
    if "init_rel_err" in results["slopes"]:
        s = results["slopes"]["init_rel_err"]
        xs = np.array([channels[0], channels[-1]], dtype=float)
        ax.plot(xs, np.exp(s["intercept"]) * xs ** s["slope"], color="tab:red", lw=1,
                label=f"fit: slope {s['slope']:+.2f}")
        ax.plot(xs, gm[-1] * (xs / channels[-1]) ** -0.5, color="gray", lw=1, ls="--",
                label="slope −1/2")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="channels C", ylabel="‖Θ0/K − Θ∞‖ / ‖Θ∞‖",
           title=f"CNN NTK at init vs its limit, {cfg['points']} digits")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save(fig, cfg["out"], "cnn_convergence.png"))

    # 2. Θ(x0, x_j) over digits at t = 0 and t = T with the limit: the narrowest trained
    # network on the left, the widest on the right (each its own scale), as ntk_circle.png.
    trained = sorted({r["channels"] for r in results["runs"] if r["trained"]})
    panels = [trained[0], trained[-1]] if len(trained) >= 2 else trained
    fig = Figure(figsize=(4 + 5 * len(panels), 4.5))
    axes = fig.subplots(1, 1 + len(panels),
                        gridspec_kw={"width_ratios": [1.2] + [5] * len(panels)})
    ax_img, axes = axes[0], axes[1:]
    ax_img.imshow(np.asarray(results["x0_image"]), cmap="gray_r")
    ax_img.set(xticks=[], yticks=[], title=f"x0: a {results['row_labels'][0]}")
    pos = np.arange(len(results["row_indices"]))
    ticks = ["x0"] + [str(v) for v in results["row_labels"][1:]]
    for ax, c, color in zip(axes, panels, ("tab:orange", "tab:blue")):
        for i, r in enumerate(r for r in results["runs"] if r["channels"] == c and r["trained"]):
            ax.plot(pos, r["ntk_row_x0_t0"], "o-", color=color, lw=0.9, ms=3, alpha=0.8,
                    label="init" if i == 0 else None)
            ax.plot(pos, r["ntk_row_x0_T"], "^--", color=color, lw=0.9, ms=3, alpha=0.8,
                    label=f"after {cfg['steps']} steps" if i == 0 else None)
        ax.plot(pos, results["limit"]["ntk_row_x0"], "k-", lw=2, label="limit Θ∞")
        ax.set_xticks(pos, ticks, fontsize=8)
        drift = next(e for e in per if e["channels"] == c)["drift"]["mean"]
        ax.set(xlabel="digit x_j (its label), ordered by Θ∞(x0, x_j)",
               title=f"{c} channels: the kernel moved {drift:.1%}")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("Θ(x0, x_j)")
    fig.tight_layout()
    paths.append(_save(fig, cfg["out"], "cnn_kernel_row.png"))
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
