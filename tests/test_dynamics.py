"""The training-dynamics toolkit and a tiny end-to-end run of the demo."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from torch import nn

import torch_ntk
from torch_ntk.apps.demo import circle, cli
from torch_ntk.dynamics.training import train_mse

F64 = torch.float64


def test_train_mse_is_discrete_kernel_gradient_descent():
    """For a linearized model, each GD step is exactly f <- f - lr/n · Θ0 (f - y)."""
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(F64)
    x, x_test, y = (torch.randn(5, 3, dtype=F64), torch.randn(4, 3, dtype=F64),
                    torch.randn(5, 2, dtype=F64))
    k = torch_ntk.empirical_ntk(net, torch.cat([x, x_test]), mode="full")
    k2 = k.permute(0, 2, 1, 3).reshape(18, 18)
    lin = torch_ntk.linearize(net)
    seen = []
    rec = train_mse(lin, x, y, steps=30, learning_rate=0.3, record_steps=[0, 7, 30],
                              x_test=x_test, x_ntk=x, ntk_mode="full", ntk_method="jacobian",
                              callback=lambda s, loss: seen.append(s))
    assert rec.steps == [0, 7, 30] and seen == list(range(1, 31))
    assert rec.fx_train.shape == (3, 5, 2) and rec.fx_test.shape == (3, 4, 2)
    assert rec.ntk.shape == (3, 5, 5, 2, 2) and rec.loss.shape == (31,)
    with torch.no_grad():
        f = torch.cat([net(x), net(x_test)]).reshape(-1)
    yv = y.reshape(-1)
    for step in range(31):
        if step in rec.steps:
            i = rec.steps.index(step)
            got = torch.cat([rec.fx_train[i], rec.fx_test[i]]).reshape(-1)
            torch.testing.assert_close(got, f, rtol=1e-10, atol=1e-10)
            loss = (f[:10] - yv).square().sum() / (2 * y.numel())
            torch.testing.assert_close(rec.loss[step], loss, rtol=1e-10, atol=1e-12)
        f = f - 0.3 / y.numel() * k2[:, :10] @ (f[:10] - yv)
    # The linearized model's NTK does not move.
    torch.testing.assert_close(rec.ntk[-1], rec.ntk[0], rtol=1e-10, atol=1e-10)


def test_train_mse_errors():
    net = nn.Linear(2, 1)
    x, y = torch.randn(3, 2), torch.randn(3, 1)
    with pytest.raises(ValueError, match=r"record_steps must lie in \[0, 4\]"):
        train_mse(net, x, y, steps=4, learning_rate=0.1, record_steps=[5])
    with pytest.raises(ValueError, match="y_train has shape"):
        train_mse(net, x, torch.randn(3), steps=1, learning_rate=0.1)


def test_loglog_slope_and_circle():
    widths = [16, 64, 256]
    slope, intercept = circle.loglog_slope(widths, [3.0 * w ** -0.5 for w in widths])
    assert math.isclose(slope, -0.5, abs_tol=1e-12)
    assert math.isclose(intercept, math.log(3.0), abs_tol=1e-12)
    pts = circle.unit_circle(torch.tensor([0.0, math.pi / 2]))
    torch.testing.assert_close(pts, torch.tensor([[1.0, 0.0], [0.0, 1.0]]), atol=1e-7, rtol=0)


def test_demo_quick_run(tmp_path, capsys):
    parser = cli.add_demo_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--quick", "--widths", "8", "32", "--steps", "5", "--seeds", "3",
                              "--circle-points", "8", "--device", "cpu", "--no-progress",
                              "--out", str(tmp_path / "run")])
    results = cli.run_demo(args)
    printed = capsys.readouterr().out
    assert "log-log slope vs width" in printed and "results.json" in printed

    with open(tmp_path / "run" / "results.json") as f:
        saved = json.load(f)
    assert saved["config"]["widths"] == [8, 32] and saved["config"]["seeds"] == 3
    assert saved["config"]["steps"] == 5 and saved["config"]["device"] == "cpu"
    assert len(saved["runs"]) == 6 and len(saved["circle_gamma"]) == 8
    assert set(saved["slopes"]) == {"init_rel_err", "drift", "net_vs_kernel",
                                    "net_vs_linearized"}
    for run in saved["runs"]:
        for key in ("init_rel_err", "drift", "net_vs_kernel", "net_vs_linearized", "loss_T"):
            assert math.isfinite(run[key]) and run[key] >= 0
        assert run["loss_T"] < run["loss_0"]
    assert saved["slopes"] == json.loads(json.dumps(results["slopes"]))
    # Even this tiny run must show the paper's trends: every distance falls with width, at a
    # rate of the order of width^(-1/2) (theory: -0.5 for init and net vs kernel, -0.5 to -1
    # for the drift); a sign error or a broken limit shows up as a slope near 0 or positive.
    for metric in ("init_rel_err", "drift", "net_vs_kernel"):
        assert -1.5 < saved["slopes"][metric]["slope"] < -0.1, (metric, saved["slopes"])
    assert len(saved["plots"]) == 3
    for path in saved["plots"]:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_demo_rejects_bad_options(tmp_path):
    parser = cli.add_demo_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--quick", "--depth", "1", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="--depth must be an integer >= 2"):
        cli.run_demo(args)


def test_circle_limit_bands_are_the_ensembles_gaussian_percentiles(tmp_path):
    """The demo's bands: mean ± z·sd of the exact ensemble, close to Monte Carlo over GP draws."""
    cfg = dict(circle_points=8, depth=3, activation="relu", w_std=1.0, b_std=0.1, lr=0.5,
               steps=20)
    data = circle.limit_data(cfg)
    n, nngp, ntk = data["n_train"], data["nngp"], data["ntk"]
    pct = data["percentiles_circle"]
    assert set(pct) == {10.0, 50.0, 90.0}
    torch.testing.assert_close(pct[50.0], data["mean_circle"], rtol=0, atol=1e-15)
    gen = torch.Generator().manual_seed(0)
    samples = 20000
    chol = torch.linalg.cholesky(nngp + 1e-12 * torch.eye(nngp.shape[0], dtype=F64))
    f0 = chol @ torch.randn(nngp.shape[0], samples, generator=gen, dtype=F64)
    y = data["y_train"].expand(n, samples)
    # One output column per draw; the loss is normalised by y.numel(), hence lr · samples.
    fn = torch_ntk.predict.gradient_descent_mse(ntk[:n, :n], y, learning_rate=0.5 * samples)
    draws = fn(20.0, f0[:n], f0[n:], ntk[n:, :n])[1]  # (G, samples)
    sd = data["sd_circle"]
    torch.testing.assert_close(draws.std(1), sd, rtol=0.05, atol=1e-6)
    for p, band in pct.items():
        mc = torch.quantile(draws, p / 100, dim=1)
        assert bool(((mc - band).abs() <= 0.06 * sd + 1e-9).all()), p


def test_pca_fit_rate_recovers_an_exponential():
    from torch_ntk.apps.demo import pca
    t = torch.arange(11, dtype=F64)
    assert math.isclose(pca.fit_rate(-3.0 * torch.exp(-0.07 * t)), 0.07, rel_tol=1e-12)
    assert math.isnan(pca.fit_rate(torch.tensor([1.0, 0.0, -1.0], dtype=F64)))


def test_demo_pca_quick_run(tmp_path, capsys):
    parser = cli.add_demo_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--experiment", "pca", "--quick", "--pca-points", "48",
                              "--widths", "512", "--steps", "8", "--device", "cpu",
                              "--no-progress", "--out", str(tmp_path / "pca")])
    results = cli.run_demo(args)
    assert "predicted rate along v2" in capsys.readouterr().out
    with open(tmp_path / "pca" / "results.json") as f:
        saved = json.load(f)
    assert saved["config"]["points"] == 48 and saved["config"]["experiment"] == "pca"
    lam = saved["eigenvalues"]
    assert len(lam) == 10 and all(a >= b > 0 for a, b in zip(lam, lam[1:]))
    pred = saved["predicted_rate_per_step"]
    lr = saved["config"]["lr"]
    assert math.isclose(pred, -math.log1p(-lr * lam[1] / 48), rel_tol=1e-12)
    (row,) = saved["per_width"]
    assert row["width"] == 512 and 0.5 * pred < row["rate_mean"] < 1.5 * pred
    (run,) = saved["runs"]
    assert len(run["component"]) == 9 and run["loss_T"] < run["loss_0"]
    assert results["per_width"][0]["rate_mean"] == row["rate_mean"]
    assert len(saved["plots"]) == 2
    for path in saved["plots"]:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_demo_all_runs_every_experiment(tmp_path):
    parser = cli.add_demo_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--experiment", "all", "--quick", "--widths", "16", "--steps",
                              "3", "--seeds", "1", "--circle-points", "4", "--pca-points", "24",
                              "--device", "cpu", "--no-progress", "--out", str(tmp_path)])
    results = cli.run_demo(args)
    assert set(results) == {"circle", "pca", "cnn"}
    for name in ("circle", "pca", "cnn"):
        assert (tmp_path / name / "results.json").exists()
    with pytest.raises(ValueError, match="--pca-points must lie in"):
        cli.run_demo(parser.parse_args(["--experiment", "pca", "--quick", "--pca-points", "5000",
                                        "--out", str(tmp_path / "bad")]))
