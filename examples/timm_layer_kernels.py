"""Per-layer shares of a timm CNN's empirical NTK, plotted.

    python examples/timm_layer_kernels.py --model resnet18 --images 8 --out layer_shares.png

``empirical_ntk(..., by_layer=True)`` gives the kernel over each module's own parameters; the
kernels sum to the whole. The share of a layer is its part of the kernel's mean diagonal (the
trace mode, over the images given): how much of the function's sensitivity to its parameters
that layer carries at initialisation. Random weights (no download), random images. timm
zero-initialises the last norm of every residual block (``zero_init_last``), which makes the
layers inside the blocks carry nothing at initialisation; ResNets are built without it here.
``by_layer`` contracts each block's factors module by module, in one pass.

Needs ``timm`` and ``matplotlib``. Prints the shares and writes a bar chart.
"""
from __future__ import annotations

import argparse
import time

import torch

import torch_ntk


def shares(model: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """{module name: its share of the kernel's mean diagonal}, in the model's order."""
    parts = torch_ntk.empirical_ntk(model, x, mode="trace", by_layer=True)
    total = sum(k.diagonal().mean() for k in parts.values())
    return {name: float(k.diagonal().mean() / total) for name, k in parts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18", help="a timm model name")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--out", default="layer_shares.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import timm

    torch.manual_seed(args.seed)
    extra = {"zero_init_last": False} if args.model.startswith("resnet") else {}
    model = timm.create_model(args.model, pretrained=False, num_classes=args.classes,
                              **extra).eval()
    x = torch.randn(args.images, 3, args.size, args.size)
    start = time.perf_counter()
    share = shares(model, x)
    seconds = time.perf_counter() - start
    print(f"{args.model}: {len(share)} modules with parameters, {seconds:.1f} s")
    for name, s in share.items():
        print(f"  {name or '<root>':40s} {s:7.2%}")

    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(share)), 4.0))
    ax.bar(range(len(share)), [100 * s for s in share.values()])
    ax.set_xticks(range(len(share)), [n or "<root>" for n in share], rotation=90, fontsize=6)
    ax.set_ylabel("share of the NTK's mean diagonal (%)")
    ax.set_title(f"{args.model} at initialisation, {args.images} images of {args.size} px")
    fig.tight_layout()
    fig.savefig(args.out, dpi=150)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
