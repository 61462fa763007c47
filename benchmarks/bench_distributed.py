"""torch_ntk.distributed: strong scaling on one machine, the cost of ``path``, and an estimate
for an N = 10⁶ trace kernel on many GPUs.

Usage: python benchmarks/bench_distributed.py [--n 8192] [--worlds 1 2] [--repeats 2]
       [--tmp /tmp] [--json out.json] [--h200-entries-per-s 1.64e9] [--node-write-gbps 5]

1. The trace kernel of the benchmark MLP (64-512-512-512-10, float32, x2=None) over N inputs
   by 1 and 2 gloo processes on this machine's cores (threads split evenly between the
   processes), kept in memory (``path=None``, all-gathered) and written to a ``.npy`` file
   (``path=``, fresh file each repeat). Median wall time of ``--repeats`` runs after a
   warm-up, between barriers. Before timing, the in-memory result's 64×64 corner is compared
   with the single-process ``torch_ntk.empirical_ntk`` and the file with the in-memory result.
2. An estimate for N = 10⁶ on G GPUs: compute time N² / (G · rate), the rate a measured H200
   rate (``--h200-entries-per-s``: the N = 100,000 trace kernel in benchmarks/RESULTS.md,
   10¹⁰ entries in 6.1 s of compute), the file N² · 4 bytes written at ``--node-write-gbps``
   per 8-GPU node, and the measured local cost of ``path`` per entry as a floor.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

import torch_ntk
from torch_ntk.apps.bench.methods import mlp
from torch_ntk.apps.machine import machine_info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192, help="inputs N")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="folder for the files")
    parser.add_argument("--json", default=None, help="write the results to this file")
    parser.add_argument("--h200-entries-per-s", type=float, default=1e10 / 6.1)
    parser.add_argument("--node-write-gbps", type=float, default=5.0,
                        help="assumed write bandwidth per 8-GPU node to a shared filesystem")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    result = {"machine": machine_info("cpu"), "n": args.n, "threads": threads,
              "load_before": os.getloadavg(), "runs": []}
    for world in args.worlds:
        result["runs"].append(_spawn(world, args, max(1, threads // world)))
    result["load_after"] = os.getloadavg()
    result["estimate"] = _estimate(result["runs"], args)
    _print(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


# Internal helpers

def _spawn(world: int, args, threads: int) -> dict:
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        out = os.path.join(tmp, "result.json")
        torch.multiprocessing.spawn(_rank, args=(world, args, threads, tmp, out), nprocs=world)
        with open(out) as f:
            return json.load(f)


def _rank(rank: int, world: int, args, threads: int, tmp: str, out: str) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                            world_size=world, timeout=datetime.timedelta(minutes=30))
    model = mlp()
    x = torch.randn(args.n, 64, generator=torch.Generator().manual_seed(0))
    path = os.path.join(tmp, "k.npy")
    kernel = torch_ntk.distributed.empirical_ntk
    k = kernel(model, x[:256], mode="trace")  # warm-up
    k = kernel(model, x, mode="trace")
    corner = torch_ntk.empirical_ntk(model, x[:64], mode="trace")
    check = float((k[:64, :64] - corner).abs().max() / corner.abs().max())
    memory, files = [], []
    for r in range(args.repeats):
        memory.append(_timed(lambda: kernel(model, x, mode="trace")))
        _remove(rank, path)
        files.append(_timed(lambda: kernel(model, x, mode="trace", path=path)))
    on_disk = torch_ntk.distributed.empirical_ntk(model, x, mode="trace", path=path)
    same = bool(torch.equal(on_disk, k))
    tiles = _tiles(model, x, world)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"world": world, "threads_per_rank": threads, "memory_s": memory,
                       "path_s": files, "memory_median_s": statistics.median(memory),
                       "path_median_s": statistics.median(files), "tiles": tiles,
                       "corner_vs_single_process": check, "file_equals_memory": same,
                       "file_gib": os.path.getsize(path) / 2 ** 30}, f)
    dist.destroy_process_group()


def _timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def _remove(rank: int, path: str) -> None:
    dist.barrier()
    if rank == 0:
        for p in [path] + [f"{path}.progress.{r}" for r in range(dist.get_world_size())]:
            if os.path.exists(p):
                os.remove(p)
    dist.barrier()


def _tiles(model, x, world: int) -> dict:
    """The tile grid the distributed call used (as it chooses it)."""
    from torch_ntk.distributed.api import _tile_side
    from torch_ntk.empirical.api import KernelPlan
    with KernelPlan(model, x, mode="trace") as plan:
        default = plan.rows[0].stop - plan.rows[0].start
    side = _tile_side(x.shape[0], x.shape[0], True, world, default)
    m = math.ceil(x.shape[0] / side)
    return {"side": side, "tiles": m * (m + 1) // 2}


def _estimate(runs: list, args) -> dict:
    """Wall time and disk of an N = 10⁶ trace kernel (float32, x2=None) on 8 and 64 GPUs."""
    n = 10 ** 6
    entries = n * n
    disk = entries * 4 + 128
    one = next(r for r in runs if r["world"] == 1)
    local_path_s_per_entry = max(0.0, one["path_median_s"] - one["memory_median_s"]) / args.n ** 2
    est = {"n": n, "disk_bytes": disk, "disk_tib": disk / 2 ** 40,
           "h200_entries_per_s": args.h200_entries_per_s,
           "node_write_gbps": args.node_write_gbps,
           "local_path_overhead_s_per_entry": local_path_s_per_entry, "gpus": {}}
    for gpus in (8, 64):
        compute = entries / (gpus * args.h200_entries_per_s)
        write = disk / (math.ceil(gpus / 8) * args.node_write_gbps * 1e9)
        est["gpus"][gpus] = {"compute_s": compute, "write_s": write,
                             "wall_s": max(compute, write),
                             "bytes_per_gpu": disk / gpus}
    return est


def _print(result: dict) -> None:
    print(f"N = {result['n']} trace kernel, MLP 64-512-512-512-10 float32, x2=None; "
          f"load before {result['load_before'][0]:.2f}, after {result['load_after'][0]:.2f}")
    print("| processes | threads each | tiles (side) | in memory s | path s | path / memory "
          "| speed-up (memory) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = result["runs"][0]["memory_median_s"]
    for r in result["runs"]:
        print(f"| {r['world']} | {r['threads_per_rank']} | {r['tiles']['tiles']} "
              f"({r['tiles']['side']}) | {r['memory_median_s']:.2f} | {r['path_median_s']:.2f} | "
              f"{r['path_median_s'] / r['memory_median_s']:.2f}x | "
              f"{base / r['memory_median_s']:.2f}x |")
    est = result["estimate"]
    print(f"N = 10^6 trace (float32): file {est['disk_tib']:.2f} TiB")
    for gpus, e in est["gpus"].items():
        print(f"  {gpus} H200: compute {e['compute_s']:.0f} s, writing {e['write_s']:.0f} s "
              f"-> ~{e['wall_s']:.0f} s; {e['bytes_per_gpu'] / 2 ** 30:.0f} GiB per GPU")


if __name__ == "__main__":
    main()
