"""The demo's cnn experiment (a CNN's NTK against its infinite-width limit) and the CNN kernels
of benchmarks/digits_regression.py, at tiny sizes."""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os

import pytest
import torch

import torch_ntk
from torch_ntk.apps.demo import cli, cnn

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

F64 = torch.float64
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these tiny kernels are many small ops, which a second thread only
    slows down (5-10× on a busy 2-core machine); the results don't depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run(tmp_path, *options):
    parser = cli.add_demo_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--experiment", "cnn", "--quick", "--device", "cpu",
                              "--no-progress", "--out", str(tmp_path), *options])
    return cli.run_demo(args)


def test_cnn_quick_run_writes_results_and_plots(tmp_path, capsys):
    results = _run(tmp_path / "cnn", "--cnn-channels", "4", "16", "--seeds", "2", "--steps",
                   "3", "--cnn-points", "8")
    printed = capsys.readouterr().out
    assert "CNTK convergence on 8 digits" in printed and "log-log slope vs channels" in printed
    assert "kernel moved during training" in printed and "results.json" in printed

    with open(tmp_path / "cnn" / "results.json") as f:
        saved = json.load(f)
    cfg = saved["config"]
    assert cfg["experiment"] == "cnn" and cfg["channels"] == [4, 16] and cfg["seeds"] == 2
    assert cfg["points"] == 8 and cfg["steps"] == 3 and cfg["dtype"] == "float64"
    assert len(saved["runs"]) == 4
    # The narrowest and the widest networks are trained (the first train_seeds seeds).
    trained = [(r["channels"], r["seed"]) for r in saved["runs"] if r["trained"]]
    assert trained == [(4, 0), (16, 0)]
    for run in saved["runs"]:
        assert math.isfinite(run["init_rel_err"]) and run["init_rel_err"] > 0
        assert len(run["ntk_row_x0_t0"]) == 8
        if run["trained"]:
            assert run["loss_T"] < run["loss_0"] and run["drift"] > 0
            assert len(run["ntk_row_x0_T"]) == 8 and 0 <= run["train_acc"] <= 1
    # The row: x0 first, then the others by decreasing Θ∞(x0, x_j).
    assert saved["row_indices"][0] == 0 and sorted(saved["row_indices"]) == list(range(8))
    lim_row = saved["limit"]["ntk_row_x0"]
    assert all(a >= b for a, b in zip(lim_row[1:], lim_row[2:]))
    assert [e["channels"] for e in saved["per_channels"]] == [4, 16]
    assert "drift" in saved["per_channels"][0] and "drift" in saved["per_channels"][1]
    assert set(saved["slopes"]) == {"init_rel_err"}
    assert saved["slopes"] == json.loads(json.dumps(results["slopes"]))
    assert [os.path.basename(p) for p in saved["plots"]] == ["cnn_convergence.png",
                                                             "cnn_kernel_row.png"]
    for path in saved["plots"]:
        with open(path, "rb") as f:
            assert f.read(8) == PNG


def test_cnn_error_falls_with_channels(tmp_path):
    """With enough seeds the fitted slope is negative, of the order of -1/2, and the mean
    error falls from the narrowest to the widest network."""
    # One seed's error is spread widely (its largest eigenvalue's fluctuation dominates) and
    # below 8 channels it saturates: 8 seeds of 8 and 128 channels give a slope of -0.53.
    results = _run(tmp_path, "--cnn-channels", "8", "128", "--seeds", "8", "--steps", "1",
                   "--cnn-points", "6")
    per = results["per_channels"]
    assert per[-1]["init_rel_err"]["mean"] < per[0]["init_rel_err"]["mean"]
    assert per[-1]["init_rel_err"]["geomean"] < per[0]["init_rel_err"]["geomean"]
    slope = results["slopes"]["init_rel_err"]
    assert -1.2 < slope["slope"] < -0.25, slope
    assert slope["slope_of_means"] < 0


def test_cnn_limit_matches_the_network_it_plots():
    """Θ∞ of limit_data is analytic_ntk of the experiment's network, and empirical_ntk of a
    wide one is close to it."""
    cfg = dict(points=6, lr=None)
    data = cnn.limit_data(cfg)
    assert data["x"].shape == (6, 1, 8, 8) and data["ntk"].shape == (6, 6)
    torch.testing.assert_close(data["ntk"], torch_ntk.analytic_ntk(cnn.build("gap", 3),
                                                                   data["x"]))
    assert math.isclose(data["step_fraction"], cnn.STEP_FRACTION, rel_tol=1e-12)
    torch.manual_seed(0)
    wide = torch_ntk.empirical_ntk(cnn.build("gap", 128), data["x"], mode="trace") / cnn.OUTPUTS
    assert float(torch.linalg.norm(wide - data["ntk"]) / torch.linalg.norm(data["ntk"])) < 0.4


def test_cnn_architectures_and_errors(tmp_path):
    x = torch.randn(3, 1, 8, 8, dtype=F64)
    for arch in cnn.ARCHITECTURES:
        net = cnn.build(arch, 4)
        assert net(x).shape == (3, cnn.OUTPUTS)
        k = torch_ntk.analytic_ntk(net, x, get=("nngp", "ntk"))
        assert k.ntk.shape == (3, 3) and bool((k.ntk.diagonal() > k.nngp.diagonal()).all())
    with pytest.raises(ValueError, match="arch must be one of"):
        cnn.build("resnet", 4)
    with pytest.raises(ValueError, match="stable only below 2"):
        _run(tmp_path / "a", "--cnn-channels", "4", "--cnn-points", "6", "--lr", "1e6")
    with pytest.raises(ValueError, match="--cnn-points must be an integer in"):
        _run(tmp_path / "b", "--cnn-points", "5000")


def _digits_regression():
    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks",
                        "digits_regression.py")
    spec = importlib.util.spec_from_file_location("digits_regression", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_regression_conv_kernels_tiny(tmp_path, capsys):
    bench = _digits_regression()
    out = tmp_path / "digits.json"
    result = bench.main(["--train", "30", "--test", "20", "--depths", "2", "--activations",
                         "relu", "--net-depths", "2", "--widths", "16", "--steps", "5",
                         "--threads", str(torch.get_num_threads()), "--out", str(out)])
    printed = capsys.readouterr().out
    for name in ("cnn-flatten", "cntk-gap", "myrtle"):
        assert name in printed
    with open(out) as f:
        saved = json.load(f)
    assert saved["config"]["n_train"] == 30 and saved["config"]["n_test"] == 20
    archs = [r["architecture"] for r in saved["kernels"]]
    assert archs == ["mlp", "cnn-flatten", "cntk-gap", "myrtle"]
    for row in saved["kernels"]:
        for key in ("nngp_acc", "ntk_acc", "ntk_gd_T_acc"):
            assert 0 <= row[key] <= 1
        assert row["kernel_seconds"] >= 0
    conv = {r["architecture"]: r for r in saved["kernels"] if r["architecture"] != "mlp"}
    assert conv["cntk-gap"]["pairs"] == 30 * 31 // 2 + 20 * 30
    # Even 30 training digits are far above chance with every kernel.
    assert all(r["nngp_acc"] > 0.5 and r["ntk_acc"] > 0.5 for r in saved["kernels"])
    assert result["kernels"] == saved["kernels"]
    # Without CNNs the table is the MLP's alone.
    result = bench.main(["--train", "20", "--test", "10", "--depths", "1", "--activations",
                         "relu", "--net-depths", "1", "--widths", "8", "--steps", "2",
                         "--conv-archs", "--out", str(tmp_path / "mlp.json")])
    assert [r["architecture"] for r in result["kernels"]] == ["mlp"]


def test_digits_regression_conv_kernel_is_the_demo_networks_limit():
    """The cntk-gap row's kernel is analytic_ntk of the demo's network on the same images."""
    bench = _digits_regression()
    x_tr, y_tr, x_te, lab_te = bench.load_split(12, n_test=5)
    assert x_te.shape == (5, 64)
    k = torch_ntk.analytic_ntk(cnn.build("gap", 2), x_tr.reshape(-1, 1, 8, 8),
                               get=("nngp", "ntk"))
    row, lr = bench.regression_row(k, torch_ntk.analytic_ntk(
        cnn.build("gap", 2), x_te.reshape(-1, 1, 8, 8), x_tr.reshape(-1, 1, 8, 8),
        get=("nngp", "ntk")), y_tr, lab_te, 1e-4, 5)
    (got,) = bench.conv_kernel_rows(x_tr, y_tr, x_te, lab_te, ["cntk-gap"], 1e-4, 5)
    for key in ("nngp_acc", "ntk_acc", "ntk_gd_T_acc", "lr"):
        assert got[key] == row[key]
    assert lr == row["lr"]


def test_pooling_before_the_global_mean_changes_nothing():
    """Why ``myrtle`` has a conv-relu after its second pooling: without one, the mean of the
    2×2 window means is the global mean, and the limit is cntk-gap's exactly."""
    from torch import nn

    x = torch.randn(3, 1, 8, 8, dtype=F64)
    conv = torch_ntk.NTKConv2d(1, 2, 3, padding="same")
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), torch_ntk.NTKLinear(2, 1, w_std=1.0)]
    plain = nn.Sequential(conv, nn.ReLU(), *head)
    pooled = nn.Sequential(conv, nn.ReLU(), nn.AvgPool2d(2), *head)
    torch.testing.assert_close(torch_ntk.analytic_ntk(pooled, x), torch_ntk.analytic_ntk(plain, x),
                               rtol=1e-12, atol=1e-14)
    myrtle, gap = (torch_ntk.analytic_ntk(cnn.build(a, 1), x) for a in ("myrtle", "gap"))
    assert float((myrtle - gap).abs().max()) > 1e-6 * float(gap.abs().max())
