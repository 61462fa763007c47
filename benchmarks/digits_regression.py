"""Kernel regression on handwritten digits: NNGP and NTK against finite networks trained by GD.

Data: scikit-learn's bundled 8×8 digits (1797 images, no download), each image minus the mean
image of the training set and scaled to ``||x||² = 64``; a fixed random split (seed 0) into
``--train`` training and the rest test images. Targets are one-hot vectors minus 0.1 (10
outputs); predictions are classified by their largest output.

1. Kernels (``torch_ntk.analytic_ntk``, depth 1-5, relu and erf, ``b_std`` 0.1): test accuracy
   of NNGP and NTK regression (``torch_ntk.predict.gp_inference``, ridge ``--diag-reg``
   relative to the mean diagonal), and of kernel gradient descent with the NTK stopped at
   the networks' training time T (``gradient_descent_mse``, from zero outputs).
   Next to them, the infinite-width kernels of three ReLU CNNs on the same images as
   (N, 1, 8, 8) (``torch_ntk.analytic_ntk(model, x)``, float64, no biases; the networks of
   ``torch_ntk.apps.demo.cnn.build``), to show what the architecture buys:
   ``cnn-flatten`` (conv3-relu ×2, flatten, dense: each position's covariance with itself
   only, O(64) per pair of images), ``cntk-gap`` (conv3-relu ×2, avgpool 2, conv3-relu,
   global average pool, dense: the network of ``python -m torch_ntk demo --experiment cnn``)
   and ``myrtle`` (conv3-relu ×2, avgpool 2, conv3-relu, avgpool 2, conv3-relu, global
   average pool, dense: each pooling followed by a conv-relu, as in Shankar et al. 2020's
   Myrtle networks; without the last conv-relu it would be ``cntk-gap`` exactly, as the mean
   of 2×2 window means is the global mean). Pooling needs every pair of positions, 64² per
   pair of images: with the default 600 training and 1197 test images each pooled kernel
   takes about 3 minutes on one CPU core (the time is printed and stored); ``--test N`` keeps only the first N test images (for every kernel and
   network, so that the rows stay comparable) and ``--conv-archs`` picks the CNNs (none:
   ``--conv-archs`` alone).
2. Networks (``torch_ntk.NTKMLP``, float32) of the depths in ``--net-depths`` and widths in
   ``--widths``, trained by full-batch gradient descent on the MSE loss for ``--steps`` steps
   (``lr · λ_max / (10 N) = 1``, λ_max the largest eigenvalue of the NTK Gram matrix, as the
   discrete steps are stable for values below 2): test accuracy, and their distance to
   their kernel's prediction at T from the network's own initial outputs (RMS of the test
   outputs' difference and the fraction of test images classified alike).

Writes a JSON file and prints a table. Run: ``python benchmarks/digits_regression.py``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import torch

import torch_ntk
from torch_ntk.dynamics.training import train_mse
from torch_ntk.predict import gp_inference, gradient_descent_mse

F64 = torch.float64
# The CNN kernels: name in the table -> architecture of torch_ntk.apps.demo.cnn.build.
CONV_ARCHS = {"cnn-flatten": "flatten", "cntk-gap": "gap", "myrtle": "myrtle"}


def load_split(n_train: int, seed: int = 0, n_test: int | None = None):
    """Train/test inputs (float64), one-hot targets minus 0.1, and test labels; the first
    ``n_test`` test images of the split only, when given."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=F64)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train:]
    te = te if n_test is None else te[:n_test]
    x = x - x[tr].mean(0)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(x.shape[1])
    y = torch.nn.functional.one_hot(labels, 10).to(F64) - 0.1
    return x[tr], y[tr], x[te], labels[te]


def accuracy(f: torch.Tensor, labels: torch.Tensor) -> float:
    return float((f.argmax(-1) == labels).double().mean())


def kernel_rows(x_tr, y_tr, x_te, lab_te, depths, activations, b_std, diag_reg, steps):
    """Accuracy of NNGP/NTK regression and of NTK gradient descent at time T, per kernel."""
    rows, kernels = [], {}
    for act in activations:
        for depth in depths:
            kw = dict(depth=depth, activation=act, b_std=b_std, get=("nngp", "ntk"))
            start = time.perf_counter()
            k_tr, k_te = torch_ntk.analytic_ntk(x_tr, **kw), torch_ntk.analytic_ntk(x_te, x_tr,
                                                                                    **kw)
            seconds = time.perf_counter() - start
            row, lr = regression_row(k_tr, k_te, y_tr, lab_te, diag_reg, steps)
            kernels[(act, depth)] = (k_tr.ntk, k_te.ntk, lr)
            rows.append({"architecture": "mlp", "activation": act, "depth": depth, **row,
                         "kernel_seconds": seconds})
    return rows, kernels


def regression_row(k_tr, k_te, y_tr, lab_te, diag_reg, steps):
    """Accuracies of NNGP/NTK regression and of NTK gradient descent at T from the kernels
    ``k_tr`` (train × train) and ``k_te`` (test × train), namedtuples (nngp, ntk); and the
    learning rate of that gradient descent."""
    post = gp_inference(k_tr, y_tr, diag_reg=diag_reg)(None, k_te)
    lam_max = float(torch.linalg.eigvalsh(k_tr.ntk)[-1])
    lr = y_tr.shape[0] * 10 / lam_max  # lr · λ_max / y.numel() = 1
    at_t = gradient_descent_mse(k_tr.ntk, y_tr, learning_rate=lr)(
        float(steps), None, 0.0, k_te.ntk)
    return {"nngp_acc": accuracy(post.nngp.mean, lab_te),
            "ntk_acc": accuracy(post.ntk.mean, lab_te),
            "ntk_gd_T_acc": accuracy(at_t, lab_te), "lr": lr}, lr


def conv_kernel_rows(x_tr, y_tr, x_te, lab_te, archs, diag_reg, steps, batch_size=None):
    """The rows of ``kernel_rows`` for the infinite-width CNNs of ``archs`` (CONV_ARCHS keys),
    on the images (N, 1, 8, 8); each row has the seconds its two kernels took."""
    from torch_ntk.apps.demo.cnn import build

    img_tr, img_te = x_tr.reshape(-1, 1, 8, 8), x_te.reshape(-1, 1, 8, 8)
    rows = []
    for name in archs:
        model = build(CONV_ARCHS[name], channels=1)  # the limit doesn't depend on the channels
        kw = dict(get=("nngp", "ntk"), batch_size=batch_size)
        start = time.perf_counter()
        k_tr = torch_ntk.analytic_ntk(model, img_tr, **kw)
        k_te = torch_ntk.analytic_ntk(model, img_te, img_tr, **kw)
        seconds = time.perf_counter() - start
        row, _ = regression_row(k_tr, k_te, y_tr, lab_te, diag_reg, steps)
        n_tr, n_te = img_tr.shape[0], img_te.shape[0]
        rows.append({"architecture": name, "activation": "relu",
                     "depth": {"flatten": 3, "gap": 4, "myrtle": 5}[CONV_ARCHS[name]], **row,
                     "kernel_seconds": seconds,
                     "pairs": n_tr * (n_tr + 1) // 2 + n_te * n_tr})
        print(f"  kernel {name}: {seconds:.1f} s ({rows[-1]['pairs']} pairs of images)",
              file=sys.stderr)
    return rows


def network_rows(x_tr, y_tr, x_te, lab_te, kernels, net_depths, activations, widths, b_std,
                 steps, seed):
    """Networks trained by GD: accuracy and distance to their kernel's prediction at T."""
    rows = []
    for act in activations:
        for depth in net_depths:
            k_tr, k_te, lr = kernels[(act, depth)]
            predict_fn = gradient_descent_mse(k_tr, y_tr, learning_rate=lr)
            for width in widths:
                torch.manual_seed(seed)
                net = torch_ntk.NTKMLP(x_tr.shape[1], width, depth, 10, activation=act,
                                       b_std=b_std)
                start = time.perf_counter()
                rec = train_mse(net, x_tr.float(), y_tr.float(), steps=steps, learning_rate=lr,
                                x_test=x_te.float())
                seconds = time.perf_counter() - start
                f0_tr, f0_te = rec.fx_train[0].double(), rec.fx_test[0].double()
                f_net = rec.fx_test[-1].double()
                f_ker = predict_fn(float(steps), f0_tr, f0_te, k_te)[1]
                rows.append({
                    "activation": act, "depth": depth, "width": width,
                    "net_acc": accuracy(f_net, lab_te), "kernel_T_acc": accuracy(f_ker, lab_te),
                    "rms_net_vs_kernel": float((f_net - f_ker).square().mean().sqrt()),
                    "agreement": float((f_net.argmax(-1) == f_ker.argmax(-1)).double().mean()),
                    "train_loss_T": float(rec.loss[-1]), "seconds": seconds,
                })
                print(f"  trained {act} depth {depth} width {width}: {seconds:.1f} s",
                      file=sys.stderr)
    return rows


def format_table(result: dict) -> str:
    cfg = result["config"]
    lines = [f"Digits: {cfg['n_train']} train / {cfg['n_test']} test, ridge {cfg['diag_reg']:g}, "
             f"T = {cfg['steps']} steps", "",
             f"{'kernel':>11s} {'act':>5s} {'depth':>5s} {'NNGP':>7s} {'NTK':>7s} "
             f"{'NTK GD T':>9s} {'seconds':>8s}"]
    for r in result["kernels"]:
        lines.append(f"{r['architecture']:>11s} {r['activation']:>5s} {r['depth']:>5d} "
                     f"{r['nngp_acc']:>7.2%} {r['ntk_acc']:>7.2%} {r['ntk_gd_T_acc']:>9.2%} "
                     f"{r['kernel_seconds']:>8.1f}")
    if any(r["architecture"] != "mlp" for r in result["kernels"]):
        lines.append("(depth: affine layers; the CNNs: cnn-flatten conv3-relu ×2, flatten, "
                     "dense; cntk-gap conv3-relu ×2, avgpool 2, conv3-relu, GAP, dense; myrtle "
                     "conv3-relu ×2, avgpool 2, conv3-relu, avgpool 2, conv3-relu, GAP, dense)")
    lines += ["", f"{'act':>5s} {'depth':>5s} {'width':>6s} {'net acc':>8s} {'kernel T':>9s} "
              f"{'RMS net-kernel':>15s} {'same class':>11s}"]
    for r in result["networks"]:
        lines.append(f"{r['activation']:>5s} {r['depth']:>5d} {r['width']:>6d} "
                     f"{r['net_acc']:>8.2%} {r['kernel_T_acc']:>9.2%} "
                     f"{r['rms_net_vs_kernel']:>15.4f} {r['agreement']:>11.2%}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=600, help="training images (default 600)")
    parser.add_argument("--test", type=int, default=None,
                        help="test images: the first N of the split's test images (default: "
                             "all the others, 1197 with --train 600)")
    parser.add_argument("--conv-archs", nargs="*", choices=list(CONV_ARCHS),
                        default=list(CONV_ARCHS),
                        help="infinite-width CNN kernels next to the MLP ones (default: all "
                             "three; --conv-archs alone: none)")
    parser.add_argument("--conv-batch-size", type=int, default=None,
                        help="tile side of analytic_ntk for the CNN kernels (default: its own)")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--activations", nargs="+", default=["relu", "erf"])
    parser.add_argument("--net-depths", type=int, nargs="+", default=[3],
                        help="depths of the trained networks (default 3)")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--b-std", type=float, default=0.1)
    parser.add_argument("--diag-reg", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); 1 avoids oversubscription on a "
                             "busy machine")
    parser.add_argument("--out", default="benchmarks/results/digits_regression.json")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not set(args.net_depths) <= set(args.depths):
        parser.error("--net-depths must be among --depths")
    start = time.perf_counter()
    if args.test is not None and args.test < 1:
        parser.error("--test must be >= 1")
    x_tr, y_tr, x_te, lab_te = load_split(args.train, args.seed, args.test)
    kernels, ker = kernel_rows(x_tr, y_tr, x_te, lab_te, args.depths, args.activations,
                               args.b_std, args.diag_reg, args.steps)
    kernels += conv_kernel_rows(x_tr, y_tr, x_te, lab_te, args.conv_archs, args.diag_reg,
                                args.steps, args.conv_batch_size)
    nets = network_rows(x_tr, y_tr, x_te, lab_te, ker, args.net_depths, args.activations,
                        args.widths, args.b_std, args.steps, args.seed)
    result = {
        "config": {**vars(args), "n_train": x_tr.shape[0], "n_test": x_te.shape[0],
                   "torch": torch.__version__, "torch_ntk": torch_ntk.__version__,
                   "python": platform.python_version(), "threads": torch.get_num_threads(),
                   "date": datetime.datetime.now().isoformat(timespec="seconds")},
        "kernels": kernels, "networks": nets, "wall_time_s": time.perf_counter() - start,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(format_table(result))
    print(f"\nwrote {args.out} in {result['wall_time_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
