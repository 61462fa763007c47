"""`python -m torch_ntk bench` end to end at tiny sizes, the agreement check, the harness."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from torch_ntk.apps.bench import gram, harness, methods
from torch_ntk.native import route


def _bench(*args: str) -> subprocess.CompletedProcess:
    # One thread per process: nothing is timed here, and the machine may be shared.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch_ntk", "bench", *args],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_bench_writes_json_and_table(tmp_path):
    path = tmp_path / "bench.json"
    proc = _bench("--sizes", "6", "--modes", "trace", "--methods", "structured",
                  "structured-torch", "jacobian", "--repeats", "1", "--check-n", "3",
                  "--no-kernel", "--json", str(path))
    result = json.loads(path.read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"structured", "structured-torch", "jacobian"}
    assert all(r["seconds"] > 0 and r["peak_rss_gib"] > 0 for r in rows.values())
    assert max(result["agreement"].values()) < 1e-9
    # Each method ran the Gram-sum backend it names, in the check and in the timed runs.
    backends = result["agreement_backend"]
    assert backends["structured-torch/trace"] == rows["structured-torch"]["backend"] == "torch"
    if route.native_available("cpu"):
        assert backends["structured/trace"] == rows["structured"]["backend"] == "native"
        assert backends["jacobian/trace"] == rows["jacobian"]["backend"] == "native"
    assert "| 6 | trace | jacobian |" in proc.stdout


def test_bench_models_rows(tmp_path):
    path = tmp_path / "zoo.json"
    proc = _bench("--models", "mlp", "cnn", "--sizes", "2", "--methods", "structured",
                  "jacobian", "--repeats", "1", "--check-n", "2", "--json", str(path))
    result = json.loads(path.read_text())
    assert set(result["models"]) == {"mlp", "cnn"}
    for name, res in result["models"].items():
        assert [(r["model"], r["method"], r["n"], r["mode"]) for r in res["rows"]] == [
            (name, "structured", 2, "full"), (name, "jacobian", 2, "full")], res["rows"]
        assert all(r["seconds"] > 0 and r["peak_rss_gib"] > 0 for r in res["rows"])
        assert max(res["agreement"].values()) < 1e-9
    assert "P=235722" in result["models"]["cnn"]["model"]  # the tutorial CNN's parameters
    assert "### cnn" in proc.stdout and "kernel" not in result


def test_gram_extra_memory_in_a_fresh_process():
    extra = gram._child_memory("torch", 8, "full", torch.float32, False)
    assert extra is not None and extra >= 0


def test_agreement_check_switches_the_native_op_off():
    report = methods.check_agreement(["structured", "structured-torch"], "cpu", "mlp", n=2,
                                     modes=("full",))
    assert report["failed"] == {} and max(report["agreement"].values()) < 1e-9
    assert report["backend"]["structured-torch/full"] == "torch"
    if route.native_available("cpu"):
        assert report["backend"]["structured/full"] == "native"
    assert not route.is_disabled()  # switched back on after the check


def test_agreement_check_rejects_the_wrong_backend():
    with pytest.raises(RuntimeError, match="not switched off"):
        methods._check_backend("structured-torch", "native", "cpu")
    with pytest.raises(RuntimeError, match="not switched off"):
        methods._check_backend("structured-torch", "native+torch", "cpu")
    methods._check_backend("structured-torch", "torch", "cpu")
    if route.native_available("cpu"):
        with pytest.raises(RuntimeError, match="expected only 'native'"):
            methods._check_backend("structured", "torch", "cpu")


_TARGETS = '''
import time

def ok(x):
    return {"double": 2 * x}

def boom():
    raise ValueError("no kernel today")

def slow():
    time.sleep(60)
    return {}
'''


def test_harness_returns_result_failure_and_timeout(tmp_path):
    script = tmp_path / "targets.py"
    script.write_text(_TARGETS)
    assert harness.run_isolated(f"{script}:ok", {"x": 21}) == {"double": 42}
    failed = harness.run_isolated(f"{script}:boom")
    assert failed == {"skipped": "failed: ValueError: no kernel today"}
    missing = harness.run_isolated(f"{script}:absent")
    assert missing["skipped"].startswith("failed: AttributeError")
    start = time.perf_counter()
    timed_out = harness.run_isolated(f"{script}:slow", timeout=1.0)
    assert timed_out == {"skipped": "timed out after 1 s"}
    assert time.perf_counter() - start < 30


def test_harness_peak_rss_is_the_workers_own():
    ballast = bytearray(2 ** 30)  # resident in this process when the worker is forked
    ballast[::4096] = b"x" * len(ballast[::4096])
    own = harness.run_isolated("torch_ntk.apps.bench.harness:peak_rss_gib")
    assert isinstance(own, float) and 0 < own < harness.peak_rss_gib() - 0.5
    del ballast


def test_harness_median_time_and_rss():
    calls = []
    timing = harness.median_time(lambda: calls.append(1), repeats=3,
                                 warmup=lambda: calls.append(0))
    assert calls == [0, 1, 1, 1]
    assert timing["repeats"] == 3 and timing["seconds"] >= 0
    assert harness.peak_rss_gib() > 0
