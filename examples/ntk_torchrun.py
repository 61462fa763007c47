"""The NTK of an MLP over N inputs, computed by several processes (CPUs or GPUs) together.

    torchrun --nproc_per_node=2 examples/ntk_torchrun.py --inputs 4096 --path /tmp/k.npy

Each process computes a share of the tiles; with ``--path`` the kernel is written into one
``.npy`` file (stop the job and start it again: it resumes), without it every process ends up
with the whole kernel in memory. GPUs and NCCL are used when every process has a GPU, else
CPUs and gloo. Rank 0 prints the kernel's shape, the time and a check of a corner of the
kernel against the single-process ``torch_ntk.empirical_ntk``.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import torch_ntk


def main() -> None:
    args = _parse()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_gpu = torch.cuda.is_available() and torch.cuda.device_count() > local and not args.cpu
    if use_gpu:
        torch.cuda.set_device(local)
    device = torch.device("cuda", local) if use_gpu else torch.device("cpu")
    dist.init_process_group("nccl" if use_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if not use_gpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    model, x = _problem(args.inputs, device)  # same seed on every rank: same weights, inputs
    start = time.perf_counter()
    k = torch_ntk.distributed.empirical_ntk(model, x, mode=args.mode, path=args.path)
    seconds = time.perf_counter() - start
    if rank == 0:
        corner = torch_ntk.empirical_ntk(model, x[:32], mode=args.mode)
        err = float((k[:32, :32].to(corner) - corner).abs().max() / corner.abs().max())
        where = f"written to {args.path}" if args.path else "in memory on every rank"
        print(f"{world} processes on {device.type}: NTK {tuple(k.shape)} ({args.mode}, "
              f"{k.dtype}) in {seconds:.2f} s, {where}; corner vs single process: "
              f"{err:.1e} relative")
        if args.path:
            print(f"numpy.load({args.path!r}, mmap_mode='r').shape = "
                  f"{np.load(args.path, mmap_mode='r').shape}")
    dist.destroy_process_group()


def _problem(n: int, device: torch.device) -> tuple[nn.Module, torch.Tensor]:
    """The 64-512-512-512-10 ReLU MLP (float32) and N standard-normal inputs, seeded."""
    torch.manual_seed(0)
    widths = (64, 512, 512, 512, 10)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers += [nn.Linear(n_in, n_out)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    x = torch.randn(n, widths[0], generator=torch.Generator().manual_seed(1))
    return nn.Sequential(*layers).to(device), x.to(device)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # not --n: torchrun would take it for an abbreviation of its own --nnodes etc.
    p.add_argument("--inputs", type=int, default=4096, help="number of inputs N")
    p.add_argument("--mode", default="trace", choices=("trace", "diagonal", "full"))
    p.add_argument("--path", default=None, help="a .npy file all processes see (else memory)")
    p.add_argument("--cpu", action="store_true", help="use CPUs and gloo even with GPUs")
    return p.parse_args()


if __name__ == "__main__":
    main()
