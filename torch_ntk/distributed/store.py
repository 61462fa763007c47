"""Out-of-core results: the ``.npy`` files, the disk checks and the progress records.

Rank 0 checks and creates the files; every rank then writes its own tiles through a
memory map and appends ``"i j"`` to its progress record ``<path>.progress.<rank>`` only after
the tile is flushed to the file. The first line of a record is a JSON header (fingerprints of
the weights, inputs and options, shape, dtype, tiling, world size); a later run resumes only
when its header is the same.
"""
from __future__ import annotations

import glob
import json
import os
import shutil

import numpy as np
import torch
from numpy.lib import format as npy_format

_HEADER_SLACK = 4096  # an .npy header is at most a few hundred bytes


def field_paths(caller: str, path, fields: tuple[str, ...] | None) -> dict:
    """Maps each field to its file: ``path`` itself, or ``stem.<field>.npy`` per field.

    Args:
        path (str or os.PathLike): ends in ``.npy``.
        fields: ``None`` for one unnamed kernel, else the names to insert.
    Returns:
        dict: field (``None`` for the unnamed kernel) -> absolute path.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{caller}: path must be a str or os.PathLike ending in .npy (or None "
                        f"to keep the kernel in memory), got {type(path).__name__}.")
    path = os.path.abspath(os.fspath(path))
    if not path.endswith(".npy"):
        raise ValueError(f"{caller}: path must end in .npy, got {path!r}; e.g. "
                         f"{os.path.basename(path)}.npy.")
    if fields is None:
        return {None: path}
    return {f: f"{path[:-4]}.{f}.npy" for f in fields}


def numpy_dtype(caller: str, dtype: torch.dtype) -> np.dtype:
    """The numpy dtype of a kernel of torch ``dtype`` written to disk."""
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:
        raise ValueError(f"{caller}: path= writes a .npy file, which cannot hold {dtype}; use "
                         f"float32 or float64 (or path=None).") from None


def prepare(caller: str, paths: dict, base: str, shape: tuple, dtype: np.dtype,
            header: dict) -> bool:
    """Rank 0: checks the directory, the disk and any records, then creates missing files.

    Args:
        paths: field -> file, from ``field_paths``.
        base (str): the path the progress records are named after.
        shape, dtype: of each kernel; header (dict): this run's record header.
    Returns:
        bool: True when resuming a run with the same header (files kept), False when the
        files were (re)created.
    Raises:
        FileNotFoundError, PermissionError: the directory is missing or not writable.
        OSError: not enough free disk space.
        ValueError: a progress record from a run with other arguments, or a file that does not
            match its record.
    """
    folder = os.path.dirname(base)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{caller}: the directory of path does not exist: {folder!r}; "
                                f"create it (on a filesystem every rank sees) or pick another "
                                f"path.")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"{caller}: the directory of path is not writable: {folder!r}.")
    records = sorted(glob.glob(glob.escape(base) + ".progress.*"))
    for record in records:
        _check_record(caller, record, header)
    if records:
        for p in paths.values():
            _check_file(caller, p, shape, dtype, records)
    data = int(np.prod(shape)) * dtype.itemsize
    allocated = sum(_allocated(p) for p in paths.values())
    need = len(paths) * (data + _HEADER_SLACK) - allocated
    free = shutil.disk_usage(folder).free
    if need > free:
        raise OSError(28, f"{caller}: not enough disk space for path: the kernel needs "
                          f"{need / 2 ** 30:.3g} GiB more in {folder!r} but only "
                          f"{free / 2 ** 30:.3g} GiB are free; free space or pick another path.")
    if not records:
        for p in paths.values():
            npy_format.open_memmap(p, mode="w+", dtype=dtype, shape=shape).flush()
    return bool(records)


def open_for_writing(paths: dict) -> dict:
    """field -> writable ``np.memmap`` of each file."""
    return {f: np.load(p, mmap_mode="r+") for f, p in paths.items()}


def open_result(path: str) -> torch.Tensor:
    """The kernel in ``path`` as a memory-mapped tensor; the file is opened read-only.

    Pages are shared with the file until written: writes to the tensor stay in this
    process (copy-on-write) and never reach the file.
    """
    return torch.from_numpy(np.load(path, mmap_mode="c"))


class Progress:
    """This rank's progress record: the tiles already written and flushed.

    Args:
        base (str): the path the record is named after (``<base>.progress.<rank>``).
        rank (int): this rank. header (dict): this run's header (checked by ``prepare``).
    """

    def __init__(self, base: str, rank: int, header: dict) -> None:
        self.path = f"{base}.progress.{rank}"
        self.done: set[tuple[int, int]] = set()
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                lines = f.read().split("\n")
            for line in lines[1:-1]:  # the last piece is a partial line or ""
                i, j = line.split()
                self.done.add((int(i), int(j)))
            self.file = open(self.path, "a", encoding="utf-8")
            if lines[-1]:  # a line cut by a crash: start a fresh one
                self.file.write("\n")
        else:
            self.file = open(self.path, "w", encoding="utf-8")
            self.file.write(json.dumps(dict(header, rank=rank), sort_keys=True) + "\n")
            self._sync()

    def mark(self, i: int, j: int) -> None:
        """Records tile ``(i, j)``; call only after its data is flushed to the file."""
        self.file.write(f"{i} {j}\n")
        self._sync()
        self.done.add((i, j))

    def close(self) -> None:
        self.file.close()

    def _sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())


# Internal helpers

def _check_record(caller: str, record: str, header: dict) -> None:
    try:
        with open(record, encoding="utf-8") as f:
            old = json.loads(f.readline())
        old.pop("rank")
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{caller}: cannot read the progress record {record!r} ({exc}); delete "
                         f"it and the .npy file(s) to start over.") from None
    diff = sorted(k for k in set(old) | set(header) if old.get(k) != header.get(k))
    if diff:
        raise ValueError(
            f"{caller}: path holds a partial kernel from a run with different {', '.join(diff)} "
            f"(progress record {record!r}); resuming would mix two kernels. Call with the same "
            f"model weights, inputs, options and world size to resume, or delete the record(s) "
            f"{glob.escape(record[:record.rfind('.')])}.* and the .npy file(s) to start over.")


def _check_file(caller: str, path: str, shape: tuple, dtype: np.dtype, records: list) -> None:
    try:
        arr = np.load(path, mmap_mode="r")
        ok = arr.shape == tuple(shape) and arr.dtype == dtype and arr.flags.c_contiguous
        del arr
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{caller}: the progress records {records} belong to {path!r}, which is "
                         f"missing or is not a C-ordered {dtype} array of shape {tuple(shape)}; "
                         f"delete the records to start over.")


def _allocated(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except (OSError, AttributeError):
        return 0
