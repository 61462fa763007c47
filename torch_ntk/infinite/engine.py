"""Runs an infinite-width program over tiles of input pairs.

First a self pass runs the program on the pairs (x, x) of each input set, which gives every
activation and normalisation the variance of its input at each position, per input. Then each
tile of ``B1 × B2`` pairs runs the program with those variances; only the tiles on or above the
diagonal when ``x2`` is None (mirrored, the diagonal tiles made exactly symmetric). Memory is
bounded by the tile: at most a few tensors of ``B1 · B2 · (P² or P)`` entries.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import threading
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from torch_ntk.infinite.program import Program
from torch_ntk.infinite.rules.affine import Conv, _affine
from torch_ntk.infinite.rules.base import Orientation, Pair
from torch_ntk.infinite.rules.pooling import AvgPool, GlobalAvgPool
from torch_ntk.infinite.rules.structure import Input
from torch_ntk.native import pairs

# On CPU, tiles of fewer than 32768 entries (ATen's grain size) keep every elementwise op on the
# calling thread, so such tiles run in parallel on a thread pool, one op stream per core; large
# tiles use ATen's own parallelism within each op.
_CPU_TILE = 181
_CUDA_TILE = 4096
_GRAIN = 32768
# Entries of one pair tensor of a tile. CPU: on a Myrtle-style network (64² entries per pair,
# the whole network one native chain) tiles of 16 x 16 and 22 x 22 pairs were the fastest,
# 11 x 11 ~6 % slower (more calls), 8 x 8 ~15 %, 32 x 32 ~6 % (pairs below the diagonal
# computed twice).
_TILE_ENTRIES = {"cpu": 1 << 20, "other": 1 << 26}
_SELF_CHUNK = 256


def kernels(program: Program, x1: Tensor, x2: Optional[Tensor], fields: Tuple[str, ...],
            batch_size: Optional[int], out: Dict[str, Tensor]) -> None:
    """Writes the fields ("nngp", "ntk") of the program's output kernel for x1 × x2 into
    ``out`` (field -> Tensor[N1, N2]); x2 None is x1 (symmetric). Inputs in the work dtype."""
    symmetric = x2 is None
    x2 = x1 if symmetric else x2
    ntk = "ntk" in fields
    sides1 = _self_pass(program, x1, ntk)
    sides2 = sides1 if symmetric else _self_pass(program, x2, ntk)
    tile, workers = _tiling(program, batch_size, x1.device)
    n1, n2 = x1.shape[0], x2.shape[0]

    scratch = threading.local()    # per worker thread, for this call only

    def work(job: Tuple[int, int]) -> None:
        r0, c0 = job
        r1, c1 = min(r0 + tile, n1), min(c0 + tile, n2)
        with torch.no_grad():
            rows = {i: (s, r0, r1) for i, s in sides1.items()}
            cols = {i: (s, c0, c1) for i, s in sides2.items()}
            result = run(program, x1[r0:r1], x2[c0:c1], rows, cols, ntk=ntk,
                         scratch=scratch)
            for f in fields:
                value = (result.nngp if f == "nngp" else result.ntk).reshape(r1 - r0, c1 - c0)
                view = out[f][r0:r1, c0:c1]
                if symmetric and r0 == c0:   # exact symmetry within the diagonal tile
                    view.copy_(value.triu() + value.triu(1).T)
                else:
                    view.copy_(value)
                    if symmetric:
                        out[f][c0:c1, r0:r1] = value.T

    jobs = [(r0, c0) for r0 in range(0, n1, tile)
            for c0 in range(r0 if symmetric else 0, n2, tile)]
    if workers > 1 and len(jobs) > 1:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(work, jobs):
                pass
    else:
        for job in jobs:
            work(job)


def run(program: Program, xa: Tensor, xb: Tensor, sides_a: dict, sides_b: dict, *,
        ntk: bool, aligned: bool = False, record: Optional[dict] = None, scratch=None) -> Pair:
    """The output Pair of one block: x_a (B1, *in) against x_b (B2, *in), or, ``aligned``,
    each x_a[i] with itself (B2 = 1). ``sides_*``: node -> (prepared data, start, stop) of
    the rows; in the self pass (``record`` given) each node's data is prepared from the
    block's own variances and stored in ``record``. ``scratch``: an object on which the
    block keeps buffers for the next block of the same thread."""
    nodes = program.nodes
    last_use, orients, chains = _static(program, aligned, ntk)
    values: Dict[int, Pair] = {}
    native = pairs.available(xa)
    fused_into: Dict[int, int] = {}
    for i, node in enumerate(nodes):
        orient = orients[i]
        rule = node.rule
        if i in fused_into:    # computed with the node before it
            continue
        if i in program.patched_inputs:    # its convolutions read the data
            continue
        if native and i in chains:
            values[chains[i].nodes[-1]] = _run_chain(program, chains[i], i, values, xa, xb,
                                                     sides_a, sides_b, orients, scratch)
            fused_into.update((j, i) for j in chains[i].nodes[1:])
        elif node.inputs and node.inputs[0] in program.patched_inputs:
            values[i] = _affine(rule.input_window(xa, xb, orient), None, rule.w2, rule.b2,
                                orient.ntk, owned=True)
        elif isinstance(rule, Input):
            values[i] = rule.kernel(xa, xb, node.full, aligned)
        else:
            ins = [values[j] for j in node.inputs]
            for j, x in zip(node.inputs, ins):   # the last reader may overwrite a value
                x.owned = (last_use[j] == i and j != program.output
                           and node.inputs.count(j) == 1
                           and not any(v.nngp is x.nngp for m, v in values.items() if m != j))
            in_orients = [orients[j] for j in node.inputs]
            side1 = side2 = None
            if rule.uses_variance:
                if record is not None:
                    variance = in_orients[0].diagonal(ins[0].nngp)[:, 0]
                    side1 = rule.prepare(variance)
                    record[i] = side1
                else:
                    side1 = _rows(rule, sides_a[i])
                    side2 = _rows(rule, sides_b[i])
            j = program.dense_fusions.get(i)
            if j is not None:
                dense = nodes[j].rule
                values[j] = rule.apply_dense(ins[0], orient, side1, side2, dense.w2, dense.b2)
                fused_into[j] = i
            else:
                values[i] = rule.apply(ins, in_orients, orient, side1, side2)
        for j in node.inputs:
            if last_use[j] == i and j != program.output:
                values.pop(j, None)
    return values[program.output]


def _static(program: Program, aligned: bool, ntk: bool) -> Tuple[Dict[int, int], list, dict]:
    """Per program and kind of run, computed once: each node's last reader, its layout, and
    the chains of native steps (first node -> _Chain)."""
    cache = program.__dict__.setdefault("_engine_static", {})
    key = (aligned, ntk)
    if key not in cache:
        last_use: Dict[int, int] = {}
        for i, node in enumerate(program.nodes):
            for j in node.inputs:
                last_use[j] = i
        orients = [Orientation(n.full, n.shape.spatial, aligned, ntk) for n in program.nodes]
        cache[key] = (last_use, orients, _chains(program, orients, fuse_activations=not aligned))
    return cache[key]


@dataclasses.dataclass
class _Chain:
    """Consecutive nodes that one ``pair_chain`` call computes: ``nodes`` (the last holds the
    output), the ``steps``, the activation nodes whose per-input deviations the steps read
    (``acts``), the layout the steps run in (``full``), and whether the first step reads the
    input's patches (``Conv.input_window``)."""

    nodes: List[int]
    steps: List[pairs.Step]
    acts: List[int]
    full: bool
    patched: bool


def _chains(program: Program, orients: List[Orientation], *, fuse_activations: bool
            ) -> Dict[int, _Chain]:
    """Greedy chains of native steps: convolutions (each with the closed-form activation
    after it, outside the self pass), average pooling, and global average pooling after
    another step; every node after the first is the only reader of the one before."""
    nodes = program.nodes
    readers: Dict[int, List[int]] = {}
    for i, node in enumerate(nodes):
        for j in node.inputs:
            readers.setdefault(j, []).append(i)
    chains: Dict[int, _Chain] = {}
    taken: set = set()
    for i, node in enumerate(nodes):
        if i in taken or not node.inputs:
            continue
        patched = node.inputs[0] in program.patched_inputs
        full = orients[i if patched else node.inputs[0]].full
        chain = _Chain([], [], [], full, patched)
        at = i
        while True:
            covered = _step(program, orients, at, chain, fuse_activations)
            if not covered:
                break
            chain.nodes += covered
            end = covered[-1]
            if (end == program.output or len(readers.get(end, [])) != 1
                    or orients[end].full != chain.full):
                break
            at = readers[end][0]
            if nodes[at].inputs != [end]:
                break
        if chain.steps:
            chains[i] = chain
            taken.update(chain.nodes)
    return chains


def _step(program: Program, orients: List[Orientation], i: int, chain: _Chain,
          fuse_activations: bool) -> List[int]:
    """Appends node i's step to the chain; returns the nodes it covers ([]: no step)."""
    node = program.nodes[i]
    rule = node.rule
    first = not chain.steps
    if isinstance(rule, Conv) and len(rule.module.kernel_size) <= 2:
        if orients[i].full != chain.full:
            return []
        m = rule.module
        ones = (1,) * len(m.kernel_size)
        if first and chain.patched:     # the window means come from the patches
            geometry = dict(kernel=ones, stride=ones, dilation=ones, pad=(0,) * len(ones))
        else:
            geometry = dict(kernel=m.kernel_size, stride=m.stride, dilation=m.dilation,
                            pad=tuple(lo for lo, _ in rule.pads))
        j = program.fusions.get(i) if fuse_activations else None
        act = None if j is None else program.nodes[j].rule
        chain.steps.append(pairs.Step("conv", out_size=node.shape.spatial, w2=rule.w2,
                                      b2=rule.b2, act="none" if act is None else act.kind,
                                      slope=0.0 if act is None else act.slope, **geometry))
        if j is None:
            return [i]
        chain.acts.append(j)
        return [i, j]
    if not chain.full or (first and chain.patched):
        return []
    if isinstance(rule, AvgPool) and len(rule.kernel) <= 2:
        chain.steps.append(pairs.Step("pool", kernel=rule.kernel, stride=rule.stride,
                                      out_size=node.shape.spatial))
        return [i]
    spatial = program.nodes[node.inputs[0]].shape.spatial
    if isinstance(rule, GlobalAvgPool) and not first and 1 <= len(spatial) <= 2:
        chain.steps.append(pairs.Step("pool", kernel=spatial, stride=spatial,
                                      out_size=(1,) * len(spatial)))
        return [i]
    return []


def _run_chain(program: Program, chain: _Chain, i: int, values: Dict[int, Pair], xa: Tensor,
               xb: Tensor, sides_a: dict, sides_b: dict, orients: List[Orientation],
               scratch) -> Pair:
    """The output Pair of the chain that starts at node i; ``scratch`` (or None) keeps a
    buffer for the input's windows from one tile to the next."""
    end = chain.nodes[-1]
    node = program.nodes[i]
    if chain.patched:
        x = Pair(node.rule.input_window(xa, xb, orients[i], _buffer(scratch, xa, xb, orients[i])), None)
    else:
        x = values[node.inputs[0]]
    s1 = [_rows(program.nodes[j].rule, sides_a[j])[0] for j in chain.acts]
    s2 = [_rows(program.nodes[j].rule, sides_b[j])[0] for j in chain.acts]
    out = orients[end]
    k, t = pairs.chain(x.nngp, x.ntk, chain.steps, s1, s2, full=chain.full, ntk=out.ntk)
    if isinstance(program.nodes[end].rule, GlobalAvgPool):
        shape = k.shape[:2] + (1,) * len(out.spatial)
        k, t = k.reshape(shape), (None if t is None else t.reshape(shape))
    elif chain.full and not out.full:
        full = Orientation(True, out.spatial)
        k, t = full.diagonal(k), (None if t is None else full.diagonal(t))
    return Pair(k, t)


def _buffer(scratch, xa: Tensor, xb: Tensor, orient: Orientation) -> Optional[Tensor]:
    """A buffer for the input's windows of the block xa × xb in the full layout, kept on
    ``scratch`` for the next blocks (fresh tile-sized tensors cost page faults on every tile);
    None without a scratch or in the diagonal layout."""
    if scratch is None or not orient.full or orient.aligned:
        return None
    need = xa.shape[0] * xb.shape[0] * math.prod(orient.spatial) ** 2
    buf = getattr(scratch, "window", None)
    if buf is None or buf.numel() < need or buf.dtype != xa.dtype or buf.device != xa.device:
        buf = scratch.window = xa.new_empty(need)
    return buf


def _rows(rule, entry):
    data, start, stop = entry
    return rule.slice_side(data, start, stop)


def _self_pass(program: Program, x: Tensor, ntk: bool) -> Dict[int, object]:
    """node -> prepared per-input data over all of x (N rows), for the nodes that read
    variances."""
    chunks: List[dict] = []
    with torch.no_grad():
        step = max(1, min(_SELF_CHUNK, _TILE_ENTRIES["cpu"] // max(1, program.pair_entries)))
        for start in range(0, x.shape[0], step):
            record: dict = {}
            block = x[start:start + step]
            run(program, block, block, {}, {}, ntk=False, aligned=True, record=record)
            chunks.append(record)
    if len(chunks) == 1:
        return chunks[0]
    merged = {}
    for i, first in chunks[0].items():
        if isinstance(first, Tensor):
            merged[i] = torch.cat([c[i] for c in chunks])
        else:
            merged[i] = tuple(torch.cat([c[i][k] for c in chunks]) for k in range(len(first)))
    return merged


def _tiling(program: Program, batch_size: Optional[int], device: torch.device
            ) -> Tuple[int, int]:
    """(tile side, worker threads)."""
    entries = program.pair_entries
    if batch_size is not None:
        tile = batch_size
    elif device.type == "cpu":
        tile = max(1, min(_CPU_TILE, math.isqrt(_TILE_ENTRIES["cpu"] // entries)))
    else:
        tile = max(1, min(_CUDA_TILE, math.isqrt(_TILE_ENTRIES["other"] // entries)))
    if device.type != "cpu":
        return tile, 1
    threads = torch.get_num_threads()
    return tile, (threads if tile * tile * entries < _GRAIN else 1)
