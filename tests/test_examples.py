"""The examples run end to end on small settings (skipped without their extras)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_hf_lora_kernel():
    pytest.importorskip("transformers")
    text = _run("hf_lora_kernel.py", "--prompts", "24", "--test", "12", "--layers", "1",
                "--width", "16", "--length", "6")
    assert "pseudo-NTK over the 256 LoRA parameters" in text and "test accuracy" in text


def test_timm_layer_kernels(tmp_path):
    pytest.importorskip("timm")
    pytest.importorskip("matplotlib")
    out = tmp_path / "shares.png"
    text = _run("timm_layer_kernels.py", "--model", "resnet10t", "--images", "2", "--size",
                "16", "--out", str(out))
    shares = [float(line.split()[-1].rstrip("%")) for line in text.splitlines()
              if line.startswith("  ")]
    assert abs(sum(shares) - 100) < 0.5 and out.stat().st_size > 0


def test_data_attribution():
    pytest.importorskip("sklearn")
    text = _run("data_attribution.py", "--train", "200", "--test", "20", "--dims", "64", "2048",
                "--epochs", "5")
    rows = [line.split() for line in text.splitlines() if line.strip()[:1].isdigit()]
    corr = {int(r[0]): float(r[2]) for r in rows}
    assert set(corr) == {64, 2048} and corr[2048] > 0.9 and corr[2048] > corr[64], text
