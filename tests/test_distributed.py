"""torch_ntk.distributed: 2 and 3 gloo processes on this machine against the single-process
functions, out-of-core files, resuming, and errors raised on every rank."""
from __future__ import annotations

import datetime
import glob
import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import torch_ntk
from torch_ntk.distributed import store
from torch_ntk.empirical.api import KernelPlan

_JOIN_S = 120        # a spawned group that takes longer than this has hung: fail, don't wait
_COLLECTIVE_S = 30   # the process group's timeout


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 4)).double()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(11, 3, generator=g, dtype=torch.float64),
            torch.randn(6, 3, generator=g, dtype=torch.float64))


def _close(actual, expected, what: str) -> None:
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12 * scale,
                               msg=lambda m: f"{what}: {m}")


def _raises(exc_type, match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(exc_type, match=match) as info:
        fn(*args, **kwargs)
    return str(info.value)


# Scenarios run by every rank of a spawned group

def _same_as_single_process(rank: int, world: int, tmp: str, monkeypatch,
                            modes=("full", "trace", "diagonal"), extras: bool = True) -> None:
    model, (x1, x2) = _model(), _inputs()
    for mode in modes:
        for other in (None, x2):
            ref = torch_ntk.empirical_ntk(model, x1, other, mode=mode)
            what = f"empirical {mode} x2={'None' if other is None else 'x2'} world={world}"
            got = torch_ntk.distributed.empirical_ntk(model, x1, other, mode=mode)
            _close(got, ref, what + " in memory")
            path = os.path.join(tmp, f"emp_{mode}_{other is None}.npy")
            got = torch_ntk.distributed.empirical_ntk(model, x1, other, mode=mode, path=path)
            _close(got, ref, what + " path")
            _close(torch.from_numpy(np.load(path, mmap_mode="r").copy()), ref, what + " file")
    if extras:
        _by_layer(model, x1, x2, tmp)
        ref = torch_ntk.empirical_ntk(model, x1, mode="trace", method="jacobian")
        got = torch_ntk.distributed.empirical_ntk(model, x1, mode="trace", method="jacobian",
                                                  batch_size=2)
        _close(got, ref, "empirical jacobian batch_size=2")
    for other in (None, x2):
        kw = dict(depth=3, activation="relu", b_std=0.1, get=("nngp", "ntk"))
        ref = torch_ntk.analytic_ntk(x1, other, **kw)
        got = torch_ntk.distributed.analytic_ntk(x1, other, **kw)
        for f in ("nngp", "ntk"):
            _close(getattr(got, f), getattr(ref, f), f"analytic {f} in memory")
        path = os.path.join(tmp, f"ana_{other is None}.npy")
        got = torch_ntk.distributed.analytic_ntk(x1, other, **kw, path=path)
        for f in ("nngp", "ntk"):
            _close(getattr(got, f), getattr(ref, f), f"analytic {f} path")
            _close(torch.from_numpy(np.load(path[:-4] + f".{f}.npy")), getattr(ref, f),
                   f"analytic {f} file")
        if other is None:
            assert torch.equal(got.ntk, got.ntk.T), "analytic x2=None is exactly symmetric"
    if extras:
        ref = torch_ntk.analytic_ntk(x1, x2, depth=2, activation="tanh")
        got = torch_ntk.distributed.analytic_ntk(x1, x2, depth=2, activation="tanh",
                                                 path=os.path.join(tmp, "tanh.npy"))
        _close(got, ref, "analytic tanh single get, path")
        net = nn.Sequential(torch_ntk.NTKConv1d(1, 4, 3, padding="same"), nn.ReLU(),
                            nn.AvgPool1d(2), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                            torch_ntk.NTKLinear(4, 1, w_std=1.0)).double()
        xs = torch.randn(9, 1, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        for other in (None, xs[:4]):
            ref = torch_ntk.analytic_ntk(net, xs, other, get=("nngp", "ntk"))
            got = torch_ntk.distributed.analytic_ntk(net, xs, other, get=("nngp", "ntk"))
            for f in ("nngp", "ntk"):
                _close(getattr(got, f), getattr(ref, f), f"analytic of a module {f}")
        got = torch_ntk.distributed.analytic_ntk(net, xs, path=os.path.join(tmp, "net.npy"))
        _close(got, torch_ntk.analytic_ntk(net, xs), "analytic of a module, path")


def _by_layer(model, x1, x2, tmp: str) -> None:
    """by_layer: one pass (per-module fields) and one collective call per module (a layer
    that holds a child's parameters), in memory and into one file per module."""
    for net in (model, _held()):
        ref = torch_ntk.empirical_ntk(net, x1, x2, mode="trace", by_layer=True)
        got = torch_ntk.distributed.empirical_ntk(net, x1, x2, mode="trace", by_layer=True)
        assert set(got) == set(ref)
        path = os.path.join(tmp, f"layers_{type(net).__name__}.npy")
        on_disk = torch_ntk.distributed.empirical_ntk(net, x1, x2, mode="trace", by_layer=True,
                                                      path=path)
        for name in ref:
            _close(got[name], ref[name], f"by_layer {name} in memory")
            _close(on_disk[name], ref[name], f"by_layer {name} path")
            stored = np.load(f"{path[:-4]}.{name or 'root'}.npy")
            _close(torch.from_numpy(stored.copy()), ref[name], f"by_layer {name} file")


class _Holder(nn.Module):
    """Scales a child Linear applied through F.linear: its catch-all layer holds the child's
    parameters too, so by_layer takes one call per module."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width))
        self.lin = nn.Linear(width, width)

    def forward(self, h):
        return nn.functional.linear(h, self.lin.weight, self.lin.bias) * self.scale


def _held() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 256), nn.Tanh(), nn.Linear(256, 8), _Holder(8),
                         nn.Tanh(), nn.Linear(8, 2)).double()


def _errors_on_every_rank(rank: int, world: int, tmp: str, monkeypatch) -> None:
    model, (x1, x2) = _model(), _inputs()
    emp = torch_ntk.distributed.empirical_ntk
    _raises(FileNotFoundError, "directory of path does not exist", emp, model, x1,
            mode="trace", path=os.path.join(tmp, "missing", "k.npy"))
    _raises(ValueError, "path must end in .npy", emp, model, x1, path=os.path.join(tmp, "k"))
    with monkeypatch.context() as m:
        m.setattr(store.shutil, "disk_usage", lambda p: type("U", (), {"free": 100})())
        _raises(OSError, "not enough disk space", emp, model, x1, mode="trace",
                path=os.path.join(tmp, "full_disk.npy"))
    assert not os.path.exists(os.path.join(tmp, "full_disk.npy"))
    # Ranks that disagree: the same ValueError on every rank.
    other = _model()
    if rank == 1:
        with torch.no_grad():
            other[0].weight[0, 0] += 1e-3
    msg = _raises(ValueError, "model weights", emp, other, x1, mode="trace")
    assert "ranks [1] differ" in msg, msg
    _raises(ValueError, r"x1 \(ranks", emp, model, x1 + (rank == 1), mode="trace")
    _raises(ValueError, "options", emp, model, x1, mode="trace" if rank else "full")
    _raises(ValueError, "options", torch_ntk.distributed.analytic_ntk, x1, depth=2 + rank)
    # A bad argument on one rank only: that rank's error, and an error on the others.
    if rank == 1:
        _raises(ValueError, "mode must be one of", emp, model, x1, mode="bogus")
    else:
        _raises(ValueError, "raised on rank 1", emp, model, x1)
    # A rank that fails during its tiles makes the others fail too.
    with monkeypatch.context() as m:
        if rank == 1:
            m.setattr(KernelPlan, "compute_tile", _failing_tile)
            _raises(RuntimeError, "tile failed", emp, model, x1, mode="trace")
        else:
            _raises(RuntimeError, "raised on rank 1 while computing", emp, model, x1,
                    mode="trace")


def _failing_tile(self, i, j, out=None):
    raise RuntimeError("tile failed")


def _resume(rank: int, world: int, tmp: str, monkeypatch) -> None:
    model, (x1, _) = _model(), _inputs()
    emp = torch_ntk.distributed.empirical_ntk
    whole = os.path.join(tmp, "whole", "k.npy")
    parted = os.path.join(tmp, "parted", "k.npy")
    if rank == 0:
        os.makedirs(os.path.dirname(whole))
        os.makedirs(os.path.dirname(parted))
    dist.barrier()
    emp(model, x1, mode="full", batch_size=2, path=whole)
    computed: list = []
    real = KernelPlan.compute_tile

    def counting(self, i, j, out=None):
        if stop_after is not None and len(computed) == stop_after:
            raise KeyboardInterrupt("simulated kill")  # not an Exception: like a signal
        computed.append((i, j))
        return real(self, i, j, out)

    monkeypatch.setattr(KernelPlan, "compute_tile", counting)
    stop_after = 2
    with pytest.raises(BaseException, match="simulated kill|raised on rank"):
        emp(model, x1, mode="full", batch_size=2, path=parted)
    assert len(computed) == 2
    record = f"{parted}.progress.{rank}"
    with open(record) as f:
        assert len(f.read().splitlines()) == 1 + 2, "header and two tiles"
    stop_after, first = None, list(computed)
    computed.clear()
    got = emp(model, x1, mode="full", batch_size=2, path=parted)
    mine = [t for t, r in zip(_all_tiles(6), _owners(6, world)) if r == rank]
    assert sorted(computed) == sorted(set(mine) - set(first)), "only the missing tiles"
    with open(whole, "rb") as a, open(parted, "rb") as b:
        assert a.read() == b.read(), "resumed file differs from an uninterrupted run"
    _close(got, torch_ntk.empirical_ntk(model, x1, mode="full"), "resumed kernel")
    computed.clear()
    emp(model, x1, mode="full", batch_size=2, path=parted)
    assert computed == [], "a finished file is not recomputed"
    monkeypatch.undo()
    # The record belongs to these arguments: other weights or batch size are an error.
    other = _model()
    with torch.no_grad():
        other[2].bias.add_(1.0)
    _raises(ValueError, "different .*weights", emp, other, x1, mode="full", batch_size=2,
            path=parted)
    _raises(ValueError, "different .*rows", emp, model, x1, mode="full", batch_size=3,
            path=parted)


def _all_tiles(m: int) -> list:
    return [(i, j) for i in range(m) for j in range(i, m)]


def _owners(m: int, world: int) -> list:
    from torch_ntk.distributed.api import _partition
    costs = [(_side(i) * (_side(i) + 1) // 2) if i == j else _side(i) * _side(j)
             for i, j in _all_tiles(m)]
    return _partition(costs, world)


def _side(i: int) -> int:
    return 1 if i == 5 else 2  # N = 11 in blocks of 2


def _other_world_size(rank: int, world: int, tmp: str, monkeypatch) -> None:
    model, (x1, _) = _model(), _inputs()
    _raises(ValueError, "different .*world_size", torch_ntk.distributed.empirical_ntk, model,
            x1, mode="full", batch_size=2, path=os.path.join(tmp, "parted", "k.npy"))


def _worker(rank: int, world: int, tmp: str, scenarios: list) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous_{world}", rank=rank,
                            world_size=world,
                            timeout=datetime.timedelta(seconds=_COLLECTIVE_S))
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            for name in scenarios:
                globals()[name](rank, world, tmp, monkeypatch)
                dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(world: int, tmp: str, scenarios: list) -> None:
    ctx = torch.multiprocessing.start_processes(_worker, args=(world, tmp, scenarios),
                                                nprocs=world, join=False,
                                                start_method="spawn")
    deadline = time.monotonic() + _JOIN_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} ranks still running after {_JOIN_S} s: a hang")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


# Tests

def test_two_and_three_ranks(tmp_path):
    tmp = str(tmp_path)
    _spawn(2, tmp, ["_same_as_single_process", "_errors_on_every_rank", "_resume"])
    assert sorted(glob.glob(os.path.join(tmp, "parted", "k.npy.progress.*"))) == [
        os.path.join(tmp, "parted", f"k.npy.progress.{r}") for r in range(2)]
    _spawn(3, tmp, ["_other_world_size", "_three_ranks"])


def _three_ranks(rank: int, world: int, tmp: str, monkeypatch) -> None:
    sub = os.path.join(tmp, "w3")
    if rank == 0:
        os.makedirs(sub)
    dist.barrier()
    _same_as_single_process(rank, world, sub, monkeypatch, modes=("trace", "full"),
                            extras=False)


def test_needs_a_process_group():
    assert not dist.is_initialized()
    model, (x1, _) = _model(), _inputs()
    with pytest.raises(RuntimeError, match="init_process_group"):
        torch_ntk.distributed.empirical_ntk(model, x1)
    with pytest.raises(RuntimeError, match="init_process_group"):
        torch_ntk.distributed.analytic_ntk(x1, depth=2)


def test_partition_is_balanced_and_contiguous():
    from torch_ntk.distributed.api import _count, _partition, _tile_side
    costs = [3, 4, 4, 4, 3, 4, 4, 3, 4, 3]
    for world in (1, 2, 3, 4, 7):
        owners = _partition(costs, world)
        assert owners == sorted(owners)
        loads = [sum(c for c, r in zip(costs, owners) if r == k) for k in range(world)]
        assert max(loads) - min(loads) <= 2 * max(costs), (world, loads)
    for n1, n2, symmetric, world in ((8192, 8192, True, 2), (100, 30, False, 3), (5, 5, True, 8)):
        size = _tile_side(n1, n2, symmetric, world, max(n1, n2))
        assert size == 1 or _count(n1, n2, size, symmetric) >= 4 * world
