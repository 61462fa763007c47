"""Collective kernels: validate on every rank, compare fingerprints, split the tiles by cost,
compute this rank's share, then all-gather it or write it into a shared ``.npy`` file."""
from __future__ import annotations

import contextlib
import math
import os
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from torch_ntk import _modes
from torch_ntk.distributed import fingerprint, store
from torch_ntk.distributed.comm import Comm
from torch_ntk.empirical.api import KernelPlan
from torch_ntk.empirical.jacobian import module_of
from torch_ntk.infinite import analytic as _analytic
from torch_ntk.infinite import program as _program
from torch_ntk.infinite import analytic_ntk as _single_analytic_ntk

_EMPIRICAL = "torch_ntk.distributed.empirical_ntk"
_ANALYTIC = "torch_ntk.distributed.analytic_ntk"
_TILES_PER_RANK = 4                              # at least this many tiles per rank by default
_ANALYTIC_BLOCK = {"cpu": 2048, "other": 8192}   # largest analytic tile side by default


def empirical_ntk(model: nn.Module, x1, x2=None, *, mode: str = "full", method: str = "auto",
                  batch_size: int | None = None, output=None, params=None,
                  by_layer: bool = False, path: str | os.PathLike | None = None,
                  group=None) -> Tensor:
    """``torch_ntk.empirical_ntk`` computed by every rank of a process group together.

    A collective call: every rank of ``group`` calls it with the same model weights, inputs
    and options. The tiles of the kernel (only those on or above the diagonal when
    ``x2 is None``) are split into contiguous runs of equal cost, one per rank, and each rank
    computes its run on the inputs' device.

    Args:
        model (nn.Module), x1 (Tensor[N1, *in_shape], tuple or dict), x2 (like x1, optional),
            mode (str), method (str), output (callable), params: as for
            ``torch_ntk.empirical_ntk`` (``params`` as names or None: a callable can't be
            compared between ranks).
        by_layer (bool): ``{module name: kernel}`` as ``torch_ntk.empirical_ntk`` returns it,
            each block's factors contracted module by module (one collective call per module
            where a factorised layer holds parameters of several); with ``path``, one file
            ``<stem>.<module name>.npy`` per module (``<stem>.root.npy`` for the root's own).
        batch_size (int, optional): tile side. ``None``: the single-process default, made
            smaller where needed so that each rank gets at least 4 tiles.
        path (str or os.PathLike, optional): ``None`` -> every rank returns the whole kernel
            (an all-gather of the tiles). A ``.npy`` path on a filesystem all ranks see -> the
            kernel is written into that file (created by rank 0; each rank writes its tiles
            and their mirror images) and every rank returns a memory-mapped tensor of it. A
            run stopped part-way and called again with the same arguments resumes from the
            progress records ``<path>.progress.<rank>``, which stay next to the file.
        group (ProcessGroup, optional): the ranks taking part; default: the default group.

    Returns:
        Tensor: shape by ``mode`` (``(N1, N2, K, K)``, ``(N1, N2)`` or ``(N1, N2, K)``), the
        model's dtype; on x1's device for ``path=None``, else a CPU tensor mapped onto the
        file (opened read-only; writes to the tensor stay in memory, copy-on-write).

    Raises:
        RuntimeError: no initialised process group; a rank failed while computing.
        ValueError: bad arguments (as ``torch_ntk.empirical_ntk``), ranks that called with
            different weights, inputs or options, a progress record from other arguments.
        FileNotFoundError, PermissionError, OSError: ``path``'s directory missing, not
            writable or without enough free space. Every rank raises.

    Example:
        >>> # torchrun --nproc_per_node=2 script.py, after dist.init_process_group("gloo")
        >>> k = torch_ntk.distributed.empirical_ntk(model, x, mode="trace", path="k.npy")
    """
    comm = Comm(_EMPIRICAL, group, _device_of(x1))
    error, paths = None, None
    try:
        if callable(params):
            raise ValueError(f"{_EMPIRICAL}: params must be None or parameter names here (the "
                             f"ranks compare them); got a callable. Pass "
                             f"[n for n, p in model.named_parameters() if pick(n, p)].")
        params = None if params is None else sorted(params)
        plan = KernelPlan(model, x1, x2, mode=mode, method=method, batch_size=batch_size,
                          params=params, output=output)
        paths = None if path is None else store.field_paths(_EMPIRICAL, path, None)
    except Exception as exc:  # every rank must reach the same collectives
        error = exc
    comm.agree(error, "checking the arguments")
    digests = {"weights": fingerprint.model_digest(model), "x1": fingerprint.inputs_digest(x1),
               "x2": "0" * 64 if x2 is None else fingerprint.inputs_digest(x2),
               "options": fingerprint.options_digest(dict(
                   mode=mode, method=method, batch_size=batch_size, path=_name(path),
                   params=params, output=None if output is None else _describe(output),
                   by_layer=bool(by_layer)))}
    _check_same(comm, digests, _EMPIRICAL)
    with contextlib.ExitStack() as stack:
        plan = _enter(comm, stack, plan)
        if batch_size is None:
            size = _tile_side(plan.shape[0], plan.shape[1], plan.symmetric, comm.world,
                              plan.rows[0].stop - plan.rows[0].start)
            if size != plan.rows[0].stop - plan.rows[0].start:
                stack.close()
                plan = _enter(comm, stack, KernelPlan(model, x1, x2, mode=mode, method=method,
                                                      batch_size=size, params=params,
                                                      output=output))
        if not by_layer:
            return _run(comm, _PlanJob(plan), paths, digests, _EMPIRICAL)[None]
        groups, names = plan.module_groups()
        fields = tuple(names[g] or "root" for g in groups)
        if plan.owners_known():
            job = _ByLayerJob(plan, dict(zip(fields, groups)))
            out = _run(comm, job, None if path is None else store.field_paths(
                _EMPIRICAL, path, fields), digests, _EMPIRICAL)
            return {names[g]: out[f] for f, g in zip(fields, groups)}
        by_module = _by_module_names(plan, groups)
    options = dict(mode=mode, method=method, batch_size=batch_size, output=output, group=group)
    return {names[g]: empirical_ntk(model, x1, x2, params=by_module[g], **options,
                                    path=None if path is None else store.field_paths(
                                        _EMPIRICAL, path, (f,))[f])
            for f, g in zip(fields, groups)}


def analytic_ntk(x1, *args, x2: Tensor | None = None, depth: int | None = None,
                 activation: _analytic.ActivationLike = "relu", w_std: float = 1.0,
                 b_std: float = 0.0, get: Union[str, Sequence[str]] = "ntk",
                 path: str | os.PathLike | None = None,
                 group=None) -> Union[Tensor, NamedTuple]:
    """``torch_ntk.analytic_ntk`` computed by every rank of a process group together.

    A collective call, like ``torch_ntk.distributed.empirical_ntk``: each rank computes a
    share of equal cost of the tiles (blocks of at most 2048 inputs per side on CPU, 8192 on
    other devices, smaller where needed to give each rank at least 4 tiles) with
    ``torch_ntk.analytic_ntk``; diagonal tiles of ``x2=None`` use its symmetric path, so the
    kernel is exactly symmetric.

    Like the single-process function it also takes a module built from NTK layers first:
    ``analytic_ntk(model, x1, x2=None, *, get="ntk", path=None, group=None)`` (ranks compare
    the module's description, ``repr(model)``, not its weights, which the limit doesn't use).

    Args:
        x1 (Tensor[N1, n0]), x2 (Tensor[N2, n0], optional), depth (int), activation (str or
            callable), w_std (float), b_std (float), get (str or sequence of str): as for
            ``torch_ntk.analytic_ntk`` (a callable activation is compared between ranks by
            its qualified name only).
        path (str or os.PathLike, optional): ``None`` -> every rank returns the whole kernel.
            A ``.npy`` path -> as for ``empirical_ntk``; when ``get`` is a tuple each field
            goes to its own file, the field name inserted before ``.npy``
            (``k.npy`` -> ``k.nngp.npy``, ``k.ntk.npy``); the progress records are
            ``k.npy.progress.<rank>``.
        group (ProcessGroup, optional): the ranks taking part; default: the default group.

    Returns:
        Tensor[N1, N2] or a namedtuple of them (``get`` a tuple); dtype of ``x1``; on its
        device for ``path=None``, else memory-mapped CPU tensors of the files.

    Raises:
        As ``torch_ntk.analytic_ntk``, and as ``empirical_ntk`` above for the process group,
        ranks that disagree and ``path``.

    Example:
        >>> k = torch_ntk.distributed.analytic_ntk(x, depth=3, path="theta.npy")
    """
    model = None
    if isinstance(x1, nn.Module):
        if not args or len(args) > 2 or (len(args) == 2 and x2 is not None):
            raise TypeError("torch_ntk.distributed.analytic_ntk(model, x1, x2=None, *, get, "
                            "path, group): expected the inputs after the model.")
        model, x1, x2 = x1, args[0], (args[1] if len(args) == 2 else x2)
    elif args:
        if len(args) > 1 or x2 is not None:
            raise TypeError("torch_ntk.distributed.analytic_ntk(x1, x2=None, *, depth, ...): "
                            f"got {1 + len(args)} positional inputs.")
        x2 = args[0]
    comm = Comm(_ANALYTIC, group, _device_of(x1))
    error, paths, job, name = None, None, None, None
    try:
        fields = _analytic._check_get(get)
        if model is not None:
            if depth is not None:
                raise ValueError("analytic_ntk: depth describes the fully-connected form; with "
                                 "a module the layers come from the module itself.")
            x1, x2 = _analytic._check_model_inputs(x1, x2)
            _program.plan(_program.trace(model), tuple(x1.shape[1:]))
            options = dict(model=model)
        else:
            if depth is None:
                raise TypeError("analytic_ntk: give depth= for the fully-connected form, or a "
                                "module first.")
            name, _ = _analytic.resolve_activation(activation, caller="analytic_ntk")
            _analytic._check_options(depth, w_std, b_std, _analytic.DEFAULT_QUADRATURE_DEGREE,
                                     None)
            _analytic._check_inputs(x1, x2)
            options = dict(depth=depth, activation=activation, w_std=w_std, b_std=b_std)
        keys = (None,) if isinstance(get, str) else fields
        job = _AnalyticJob(x1, x2, keys, fields, options, comm.world)
        paths = None if path is None else store.field_paths(
            _ANALYTIC, path, None if isinstance(get, str) else fields)
    except Exception as exc:
        error = exc
    comm.agree(error, "checking the arguments")
    if model is not None:
        described = dict(model=repr(model), get=list(fields), path=_name(path))
    else:
        act = name if name is not None else f"{activation.__module__}.{activation.__qualname__}"
        described = dict(depth=depth, activation=act, w_std=float(w_std), b_std=float(b_std),
                         get=list(fields), path=_name(path))
    digests = {"x1": fingerprint.tensor_digest(x1),
               "x2": "0" * 64 if x2 is None else fingerprint.tensor_digest(x2),
               "options": fingerprint.options_digest(described)}
    _check_same(comm, digests, _ANALYTIC)
    out = _run(comm, job, paths, digests, _ANALYTIC)
    if isinstance(get, str):
        return out[None]
    return _analytic._kernels_type(fields)(*(out[f] for f in fields))


# Internal helpers

class _PlanJob:
    """Tiles of an entered ``KernelPlan``; one unnamed field."""

    def __init__(self, plan: KernelPlan) -> None:
        self.plan, self.fields = plan, (None,)
        self.rows, self.cols, self.symmetric = plan.rows, plan.cols, plan.symmetric
        self.shape, self.dtype, self.device = plan.shape, plan.dtype, plan.x1.device

    def tiles(self) -> list[tuple[int, int]]:
        return self.plan.tiles()

    def compute(self, i: int, j: int, outs: dict | None) -> dict:
        """field -> tile ``(i, j)``, written into ``outs[field]`` when given."""
        return {None: self.plan.compute_tile(i, j, None if outs is None else outs[None])}

    def transpose(self, tile: Tensor) -> Tensor:
        return _modes.transpose(tile, self.plan.mode)

    def release(self, i: int, j: int) -> None:
        self.plan.release(i, j)


class _ByLayerJob(_PlanJob):
    """Tiles of an entered ``KernelPlan``, one field per module: ``fields[f]`` is the module
    (by name in the plan's model) whose parameters field f's kernel sums over."""

    def __init__(self, plan: KernelPlan, modules: dict) -> None:
        super().__init__(plan)
        self.modules, self.fields = modules, tuple(modules)

    def compute(self, i: int, j: int, outs: dict | None) -> dict:
        return {f: self.plan.compute_tile(i, j, None if outs is None else outs[f], owner=g)
                for f, g in self.modules.items()}


def _by_module_names(plan: KernelPlan, groups: list[str]) -> dict[str, list[str]]:
    """Per module, the caller's names of its parameters among ``plan.params``."""
    names = plan.user_names()
    return {g: sorted(names[p] for p in plan.params if module_of(p) == g) for g in groups}


class _AnalyticJob:
    """Tiles of the analytic kernel, each one ``torch_ntk.analytic_ntk`` call.

    ``fields`` are the result's keys (``(None,)`` for a single kernel), ``names`` the kernels
    (``get``) they hold.
    """

    def __init__(self, x1: Tensor, x2: Tensor | None, fields: tuple, names: tuple,
                 options: dict, world: int) -> None:
        self.x1, self.x2, self.fields, self.names = x1, x2, fields, names
        self.options = options
        self.symmetric = x2 is None
        n1, n2 = x1.shape[0], (x1 if x2 is None else x2).shape[0]
        cap = _ANALYTIC_BLOCK["cpu" if x1.device.type == "cpu" else "other"]
        size = _tile_side(n1, n2, self.symmetric, world, min(cap, max(n1, n2)))
        self.rows = _blocks(n1, size)
        self.cols = self.rows if self.symmetric else _blocks(n2, size)
        self.shape, self.dtype, self.device = (n1, n2), x1.dtype, x1.device

    def tiles(self) -> list[tuple[int, int]]:
        return [(i, j) for i in range(len(self.rows)) for j in range(len(self.cols))
                if not (self.symmetric and j < i)]

    def compute(self, i: int, j: int, outs: dict | None) -> dict:
        a = self.x1[self.rows[i]]
        b = None if self.symmetric and i == j else (self.x1 if self.x2 is None
                                                    else self.x2)[self.cols[j]]
        if "model" in self.options:
            k = _single_analytic_ntk(self.options["model"], a, b, get=self.names)
        else:
            k = _single_analytic_ntk(a, b, get=self.names, **self.options)
        tiles = {f: getattr(k, name) for f, name in zip(self.fields, self.names)}
        if outs is not None:
            for f, t in tiles.items():
                outs[f].copy_(t)
        return tiles

    @staticmethod
    def transpose(tile: Tensor) -> Tensor:
        return tile.T

    def release(self, i: int, j: int) -> None:
        pass


def _run(comm: Comm, job, paths: dict | None, digests: dict, caller: str) -> dict:
    """Computes this rank's tiles of ``job`` and returns field -> whole kernel."""
    tiles = job.tiles()
    owner = _partition([_cost(job, i, j) for i, j in tiles], comm.world)
    if paths is None:
        return _run_in_memory(comm, job, tiles, owner)
    header = dict(caller=caller, **digests, world_size=comm.world,
                  shape=list(job.shape), dtype=str(job.dtype),
                  rows=[len(job.rows), job.rows[0].stop - job.rows[0].start],
                  cols=[len(job.cols), job.cols[0].stop - job.cols[0].start],
                  fields=[str(f) for f in paths])
    return _run_to_files(comm, job, tiles, owner, paths, header, caller)


def _run_in_memory(comm: Comm, job, tiles: list, owner: list) -> dict:
    sizes = [sum(_numel(job, i, j) for _ in job.fields) for i, j in tiles]
    totals = [sum(s for s, r in zip(sizes, owner) if r == rank) for rank in range(comm.world)]
    buf = torch.empty(max(totals), dtype=job.dtype, device=comm.device)
    error = None
    try:
        offset = 0
        for (i, j), rank in zip(tiles, owner):
            if rank == comm.rank:
                views = _views(job, buf, offset, i, j)
                tile = job.compute(i, j, views if comm.device == job.device else None)
                if comm.device != job.device:
                    for f in job.fields:
                        views[f].copy_(tile[f])
                offset += sum(v.numel() for v in views.values())
            job.release(i, j)
    except Exception as exc:
        error = exc
    comm.agree(error, "computing its tiles")
    parts = comm.all_gather(buf)
    out = {f: torch.empty(job.shape, dtype=job.dtype, device=job.device) for f in job.fields}
    offsets = [0] * comm.world
    for (i, j), rank in zip(tiles, owner):
        views = _views(job, parts[rank], offsets[rank], i, j)
        offsets[rank] += sum(v.numel() for v in views.values())
        for f, v in views.items():
            out[f][job.rows[i], job.cols[j]] = v
            if job.symmetric and j > i:
                out[f][job.cols[j], job.rows[i]] = job.transpose(v)
    return out


def _run_to_files(comm: Comm, job, tiles: list, owner: list, paths: dict, header: dict,
                  caller: str) -> dict:
    base = next(iter(paths.values())) if None in paths else _base_of(paths)
    error = None
    if comm.rank == 0:
        try:
            store.prepare(caller, paths, base, job.shape, store.numpy_dtype(caller, job.dtype),
                          header)
        except Exception as exc:
            error = exc
    comm.agree(error, "checking path", root_decides=True)
    error, maps, progress = None, None, None
    try:
        maps = store.open_for_writing(paths)
        progress = store.Progress(base, comm.rank, header)
    except Exception as exc:
        error = exc
    comm.agree(error, "opening path")
    error = None
    try:
        for (i, j), rank in zip(tiles, owner):
            if rank == comm.rank and (i, j) not in progress.done:
                _write_tile(job, maps, i, j)
                progress.mark(i, j)
            job.release(i, j)
    except Exception as exc:
        error = exc
    finally:
        progress.close()
        del maps
    comm.agree(error, "computing its tiles")
    return {f: store.open_result(p) for f, p in paths.items()}


def _write_tile(job, maps: dict, i: int, j: int) -> None:
    """Computes tile ``(i, j)`` into the memory maps (and its mirror image), then flushes."""
    r, c = job.rows[i], job.cols[j]
    direct = job.device.type == "cpu"
    targets = {f: torch.from_numpy(m)[r, c] for f, m in maps.items()} if direct else None
    tiles = job.compute(i, j, targets)
    for f, m in maps.items():
        tile = tiles[f].cpu()
        if not direct:
            m[r, c] = tile.numpy()
        if job.symmetric and j > i:
            torch.from_numpy(m)[c, r] = job.transpose(tile)
        m.flush()


def _enter(comm: Comm, stack: contextlib.ExitStack, plan: KernelPlan) -> KernelPlan:
    """Enters ``plan`` on every rank (probe forward, checks), or raises on every rank."""
    error = None
    try:
        stack.enter_context(plan)
    except Exception as exc:
        error = exc
    comm.agree(error, "preparing the model")
    return plan


def _check_same(comm: Comm, digests: dict, caller: str) -> None:
    """Raises the same ValueError on every rank when the ranks' digests differ."""
    diff = fingerprint.disagreements(digests, comm.all_gather(fingerprint.to_tensor(digests)))
    if diff:
        what = {"weights": "model weights", "x1": "x1", "x2": "x2",
                "options": "options (mode/method/batch_size/get/..., path given or not)"}
        parts = [f"{what[k]} (ranks {ranks} differ from rank 0)" for k, ranks in diff.items()]
        raise ValueError(
            f"{caller}: the ranks called with different {'; '.join(parts)}. Every rank must "
            f"pass the same weights, inputs and options: seed every rank the same way or "
            f"broadcast them from rank 0 (torch.distributed.broadcast).")


def _partition(costs: list[int], world: int) -> list[int]:
    """Owner rank of each tile: contiguous runs of (nearly) equal total cost, in order."""
    total = max(1, sum(costs))
    owners, before = [], 0
    for c in costs:
        owners.append(min(world - 1, (2 * before + c) * world // (2 * total)))
        before += c
    return owners


def _tile_side(n1: int, n2: int, symmetric: bool, world: int, cap: int) -> int:
    """Largest tile side ≤ ``cap`` giving every rank at least ``_TILES_PER_RANK`` tiles."""
    size = max(1, cap)
    while size > 1 and _count(n1, n2, size, symmetric) < _TILES_PER_RANK * world:
        size = max(1, min(size - 1, int(size / 1.25)))
    return size


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def _count(n1: int, n2: int, size: int, symmetric: bool) -> int:
    m1, m2 = math.ceil(n1 / size), math.ceil(n2 / size)
    return m1 * (m1 + 1) // 2 if symmetric else m1 * m2


def _cost(job, i: int, j: int) -> int:
    nr = job.rows[i].stop - job.rows[i].start
    nc = job.cols[j].stop - job.cols[j].start
    return nr * (nr + 1) // 2 if job.symmetric and i == j else nr * nc


def _tile_shape(job, i: int, j: int) -> tuple:
    nr = job.rows[i].stop - job.rows[i].start
    nc = job.cols[j].stop - job.cols[j].start
    return (nr, nc) + tuple(job.shape[2:])


def _numel(job, i: int, j: int) -> int:
    return math.prod(_tile_shape(job, i, j))


def _views(job, buf: Tensor, offset: int, i: int, j: int) -> dict:
    """field -> tile-shaped view of ``buf`` from ``offset`` (fields one after another)."""
    n, shape, out = _numel(job, i, j), _tile_shape(job, i, j), {}
    for f in job.fields:
        out[f] = buf[offset:offset + n].view(shape)
        offset += n
    return out


def _base_of(paths: dict) -> str:
    """The path named by the caller, from the per-field paths ``stem.<field>.npy``."""
    field, p = next(iter(paths.items()))
    return p[:-len(f".{field}.npy")] + ".npy"


def _device_of(x) -> torch.device:
    if isinstance(x, (tuple, list, dict)):
        tensors = [v for v in (x.values() if isinstance(x, dict) else x) if isinstance(v, Tensor)]
        return tensors[0].device if tensors else torch.device("cpu")
    return x.device if isinstance(x, Tensor) else torch.device("cpu")


def _describe(fn) -> str:
    """A callable as the ranks can compare it: its qualified name and code's location."""
    code = getattr(fn, "__code__", None)
    where = "" if code is None else f"@{os.path.basename(code.co_filename)}:{code.co_firstlineno}"
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__name__)}{where}"


def _name(path) -> Optional[str]:
    return None if path is None else os.path.basename(os.fspath(path))
