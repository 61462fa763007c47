"""One measurement per fresh process, and the timing/memory helpers every benchmark shares.

``run_isolated("package.module:function", kwargs)`` starts a new Python process, calls
``function(**kwargs)`` there and returns the dict it returned (JSON round-trip), so that the
peak RSS the function reports is its own. A measurement that raises, is killed or runs past
``timeout`` comes back as ``{"skipped": "failed: <reason>"}`` or
``{"skipped": "timed out after <t> s"}`` instead of raising, so a suite can go on.

The target is ``"module:function"`` (importable by the worker's interpreter) or
``"path/to/script.py:function"``. ``python=`` runs the worker under another interpreter (e.g.
a separate environment with other packages): this module imports only the standard library at
load time so it can serve as the worker there too.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

_MARK = "@@torch_ntk-harness-result "
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


def run_isolated(target: str, kwargs: dict | None = None, *, timeout: float | None = None,
                 python: str | None = None, env: dict[str, str | None] | None = None) -> dict:
    """Runs ``target(**kwargs)`` in a fresh process and returns its dict.

    Args:
        target (str): ``"module:function"`` or ``"path/to/file.py:function"``; the function
            takes JSON-able keyword arguments and returns a JSON-able dict.
        kwargs (dict, optional): its keyword arguments.
        timeout (float, optional): seconds of wall time before the process is killed.
        python (str, optional): interpreter for the worker (default: this one).
        env (dict, optional): environment changes; a value of None removes the variable.
    Returns:
        dict: the function's result, or ``{"skipped": "failed: ..."}`` /
        ``{"skipped": "timed out after ... s"}``.
    """
    cmd = [python or sys.executable, os.path.abspath(__file__), target,
           json.dumps(kwargs or {})]
    proc_env = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            proc_env.pop(key, None)
        else:
            proc_env[key] = value
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=proc_env)
    except subprocess.TimeoutExpired:
        return {"skipped": f"timed out after {timeout:g} s"}
    except OSError as err:
        return {"skipped": f"failed: cannot start {cmd[0]}: {err}"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_MARK) and proc.returncode == 0:
            return json.loads(line[len(_MARK):])
    return {"skipped": f"failed: {_failure_reason(proc)}"}


def median_time(fn: Callable[[], object], *, repeats: int = 3, warmup: Callable | None = None,
                device: str = "cpu", long_s: float = 20.0) -> dict:
    """Median wall time of ``fn()`` after a warm-up, synchronising a CUDA device around it.

    Args:
        fn: the measured call.
        repeats (int): timed calls (median reported).
        warmup (callable, optional): the warm-up call (default: ``fn`` itself).
        device (str): ``"cuda..."`` synchronises before and after each call.
        long_s (float): after a call that took longer than this, stop repeating.
    Returns:
        dict: ``seconds`` (median), ``repeats`` (calls timed), ``seconds_all``.
    """
    (warmup or fn)()
    times: list[float] = []
    for _ in range(max(1, repeats)):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        if times[-1] > long_s:
            break
    return {"seconds": statistics.median(times), "repeats": len(times), "seconds_all": times}


def sync(device: str) -> None:
    """``torch.cuda.synchronize()`` when ``device`` is a CUDA device, else nothing."""
    if str(device).startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def peak_rss_gib() -> float:
    """Peak resident memory of this process's own program (GiB).

    Linux: ``VmHWM``, which starts afresh at ``exec``; ``ru_maxrss`` would not do in a worker,
    since it keeps the parent's resident size at ``fork``. Elsewhere: ``ru_maxrss``.
    """
    try:
        return rss_kib("VmHWM") / 2 ** 20
    except OSError:
        scale = 2 ** 30 if sys.platform == "darwin" else 2 ** 20  # bytes on macOS, else KiB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def reset_peak_rss() -> bool:
    """Resets this process's peak RSS (Linux ``VmHWM``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_kib(field: str = "VmRSS") -> int:
    """A memory field of /proc/self/status in KiB (``VmRSS`` now, ``VmHWM`` peak).

    Raises:
        OSError: not on Linux, or the field is missing.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


class busy_cores:
    """Context manager: ``n`` processes that keep a core busy each (a plain Python loop), for
    timing on a shared machine; stopped on exit."""

    def __init__(self, n: int) -> None:
        self.n, self.procs = n, []

    def __enter__(self) -> "busy_cores":
        for _ in range(self.n):
            self.procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        time.sleep(0.5 if self.n else 0)   # running before the first measurement
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait()
        self.procs = []


def load_average() -> float:
    """The 1-minute load average (other processes compete for the cores), NaN if unknown."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


# Internal helpers

def _failure_reason(proc: subprocess.CompletedProcess) -> str:
    """The last line of the worker's stderr (the exception), or how it ended."""
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode < 0:
        return f"killed by signal {-proc.returncode} (out of memory?)"
    if lines:
        return lines[-1][:500]
    return f"exit status {proc.returncode} without a result"


def _load(target: str) -> Callable:
    where, _, name = target.rpartition(":")
    if not where or not name:
        raise ValueError(f"harness target must be 'module:function' or 'file.py:function', "
                         f"got {target!r}")
    if where.endswith(".py"):
        spec = importlib.util.spec_from_file_location("_harness_target", where)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {where}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return getattr(module, name)


def _worker(argv: list[str]) -> None:
    """Worker entry: ``harness.py TARGET KWARGS_JSON``; prints the marked JSON result."""
    sys.path[0] = _REPO_ROOT  # not this folder: its module names are not top-level packages
    result = _load(argv[0])(**json.loads(argv[1]))
    sys.stdout.flush()
    print(_MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    _worker(sys.argv[1:])
