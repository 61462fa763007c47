"""`python -m torch_ntk bench` end to end at a tiny size."""
from __future__ import annotations

import json
import subprocess
import sys


def test_bench_writes_json_and_table(tmp_path):
    path = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch_ntk", "bench", "--sizes", "6", "--modes", "trace",
         "--methods", "structured", "jacobian", "func-jacrev", "--repeats", "1",
         "--json", str(path)],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(path.read_text())
    assert {r["method"] for r in result["rows"]} == {"structured", "jacobian", "func-jacrev"}
    assert all(r["seconds"] > 0 and r["peak_rss_gib"] > 0 for r in result["rows"])
    assert max(result["agreement"].values()) < 1e-9
    assert "| 6 | trace | jacobian |" in proc.stdout
