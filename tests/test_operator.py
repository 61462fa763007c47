"""NTKOperator: products with the exact kernel, its diagonal, scipy solvers, and refusals."""
import numpy as np
import pytest
import torch
from torch import nn

import torch_ntk
from test_features import CASES, HOSTILE, TokenModel, hostile_case, tiny_gpt2


def dense(model, x, mode, **kw):
    """The kernel as the operator's matrix: (N, N) or (N·K, N·K) with rows n·K + a."""
    k = torch_ntk.empirical_ntk(model, x, mode=mode, method="jacobian", **kw)
    if mode == "full":
        n, _, kk, _ = k.shape
        k = k.permute(0, 2, 1, 3).reshape(n * kk, n * kk)
    return k


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["trace", "full"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_products_equal_the_kernel(case, mode, dtype):
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(0)
    make_model, make_x = CASES[case]
    model = make_model().to(dtype)
    x = make_x(g)
    x = x.to(dtype) if x.is_floating_point() else x
    k = dense(model, x, mode)
    op = torch_ntk.NTKOperator(model, x, mode=mode, batch_size=4)   # 4 doesn't divide N
    assert op.shape == k.shape and op.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    v = torch.randn(op.shape[0], 3, generator=g, dtype=dtype)
    for vec in (v, v[:, 0]):
        got, want = op @ vec, k @ vec
        assert got.shape == want.shape
        assert (got - want).abs().max() <= tol * float(want.abs().max())
    assert torch.allclose(op.diagonal(), k.diagonal(), rtol=tol, atol=0)


def test_dict_inputs_output_and_params():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = TokenModel()

        def forward(self, input_ids, mask):
            return {"logits": self.inner(input_ids * mask)}

    torch.manual_seed(0)
    model = Keyword().double()
    inputs = {"input_ids": torch.randint(1, 11, (7, 5)), "mask": torch.ones(7, 5, dtype=torch.long)}
    inputs["mask"][3, 2:] = 0
    names = ["inner.head.weight", "inner.mix.weight"]
    opts = dict(output=lambda o: o["logits"][:, 1:], params=names)
    k = dense(model, inputs, "full", **opts)
    op = torch_ntk.NTKOperator(model, inputs, mode="full", **opts)
    v = torch.randn(op.shape[0], dtype=torch.float64)
    assert torch.allclose(op @ v, k @ v, rtol=1e-12, atol=1e-12)


def test_scipy_cg_and_eigsh():
    scipy_linalg = pytest.importorskip("scipy.sparse.linalg")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1)).double()
    x = torch.randn(40, 4, dtype=torch.float64)
    y = torch.sin(x.sum(1)).numpy()
    k = dense(model, x, "trace")
    op = torch_ntk.NTKOperator(model, x, batch_size=16)
    ridge = 1e-2 * float(k.diagonal().mean())
    reg = scipy_linalg.LinearOperator(op.shape, dtype=np.float64,
                                      matvec=lambda v: op.to_scipy() @ v + ridge * v)
    alpha, info = scipy_linalg.cg(reg, y, rtol=1e-12, atol=0, maxiter=500)
    exact = np.linalg.solve(k.numpy() + ridge * np.eye(40), y)
    assert info == 0
    assert np.abs(alpha - exact).max() <= 1e-8 * np.abs(exact).max()
    top = np.sort(scipy_linalg.eigsh(op.to_scipy(), k=5, which="LA", return_eigenvectors=False))
    assert np.allclose(top, np.linalg.eigvalsh(k.numpy())[-5:], rtol=1e-10, atol=0)


def test_state_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    versions = [p._version for p in model.parameters()]
    op = torch_ntk.NTKOperator(model, torch.randn(6, 3))
    op @ torch.randn(6)
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p._version for p in model.parameters()] == versions
    assert op.matvecs == 1


def test_bad_arguments():
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="mode must be 'trace' or 'full'"):
        torch_ntk.NTKOperator(model, x, mode="diagonal")
    op = torch_ntk.NTKOperator(model, x, mode="full")
    with pytest.raises(ValueError, match=r"shape \(8,\) or \(8, r\)"):
        op @ torch.randn(4)
    with pytest.raises(ValueError, match="finite"):
        op @ torch.full((8,), float("nan"))
    with pytest.raises(TypeError, match="must be a Tensor"):
        op @ np.ones(8)


def test_samples_that_interact_are_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).train()
    with pytest.raises(ValueError, match="interact"):
        torch_ntk.NTKOperator(model, torch.randn(8, 3))


def test_a_block_that_mixes_a_rare_sample_is_refused():
    """The probe sees three samples; a term that mixes in sample 11 shows only in its block."""
    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            rare = (x[:, 0] > 5).to(x.dtype)[:, None]
            return self.lin(x) + rare.sum() * 0.1 * self.lin(x).mean(0, keepdim=True)

    torch.manual_seed(0)
    x = torch.randn(20, 3)
    x[11, 0] = 9.0
    op = torch_ntk.NTKOperator(Mixer(), x, batch_size=8)
    with pytest.raises(ValueError, match="sample 1[01]? changed|changed when the samples"):
        op @ torch.randn(20)


def test_wrong_jvp_is_refused():
    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * 1.0

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return g

        @staticmethod
        def jvp(ctx, t):
            return 2 * t

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return Twice.apply(self.lin(x))

    torch.manual_seed(0)
    op = torch_ntk.NTKOperator(Model().double(), torch.randn(5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="forward-mode derivative disagrees"):
        op @ torch.randn(5, dtype=torch.float64)


@pytest.mark.parametrize("rank", [0, 15])
@pytest.mark.parametrize("mode", ["trace", "full"])
def test_predict_through_the_operator(mode, rank):
    from torch_ntk import predict

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 24), nn.Tanh(), nn.Linear(24, 2)).double()
    x, xt = torch.randn(32, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    y = torch.sin(x[:, :2])
    k = torch_ntk.empirical_ntk(model, x, mode=mode)
    kt = torch_ntk.empirical_ntk(model, xt, x, mode=mode)
    ktt = torch_ntk.empirical_ntk(model, xt, mode=mode)
    op = torch_ntk.NTKOperator(model, x, mode=mode, batch_size=16)
    dense = predict.gradient_descent_mse(k, y, diag_reg=1e-3)
    implicit = predict.gradient_descent_mse(op, y, diag_reg=1e-3, rtol=1e-10,
                                            preconditioner_rank=rank)
    f0, ft0 = 0.1 * torch.ones_like(y), torch.zeros(6, 2, dtype=torch.float64)
    times = torch.tensor([0.0, 3.0, 300.0, 3e4], dtype=torch.float64)
    for t in (None, times):
        want, got = dense(t, f0, ft0, kt), implicit(t, f0, ft0, kt)
        for a, b in zip(want, got):
            assert a.shape == b.shape
            assert (a - b).abs().max() <= 1e-8 * float(a.abs().max())
        assert implicit.last.method == ("cg" if t is None else "lanczos")
        assert implicit.last.residual <= 1e-9 and implicit.last.iterations >= 1
    gp = predict.gp_inference(op, y, 1e-3, rtol=1e-10, preconditioner_rank=rank)
    want, got = predict.gp_inference(k, y, 1e-3)(None, kt, ktt), gp(None, kt, ktt)
    assert torch.allclose(got.mean, want.mean, rtol=0, atol=1e-8 * float(want.mean.abs().max()))
    assert torch.allclose(got.covariance, want.covariance, rtol=0,
                          atol=1e-8 * float(want.covariance.abs().max()))


def test_predict_says_when_cg_falls_short():
    from torch_ntk import predict

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 24), nn.Tanh(), nn.Linear(24, 1)).double()
    x = torch.randn(30, 4, dtype=torch.float64)
    op = torch_ntk.NTKOperator(model, x)
    fn = predict.gradient_descent_mse(op, torch.randn(30, 1, dtype=torch.float64), diag_reg=1e-6,
                                      maxiter=2, preconditioner_rank=0)
    with pytest.raises(ValueError, match="conjugate gradients reached a relative residual"):
        fn(None, 0.0, torch.zeros(2, 1, dtype=torch.float64),
           torch.zeros(2, 30, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"shape \(N, N\) = \(29, 29\)"):
        predict.gradient_descent_mse(op, torch.randn(29), diag_reg=1e-3)


def test_predict_with_any_operator_uses_nystrom():
    """An operator without random features (here a dense matrix behind the protocol) gets a
    randomized Nyström preconditioner."""
    from torch_ntk import predict

    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64))
    k = basis @ torch.diag(1.0 / torch.arange(1, 51, dtype=torch.float64) ** 2) @ basis.T

    class Dense:
        shape, dtype, device, mode = (50, 50), torch.float64, torch.device("cpu"), "trace"

        def matmul(self, v):
            return k @ v

        def diagonal(self):
            return k.diagonal()

    y = torch.randn(50, 1, generator=g, dtype=torch.float64)
    fn = predict.gradient_descent_mse(Dense(), y, diag_reg=1e-4, rtol=1e-10,
                                      preconditioner_rank=25)
    kt = torch.randn(3, 50, generator=g, dtype=torch.float64)
    want = predict.gradient_descent_mse(k, y, diag_reg=1e-4)(None, None, 0.0, kt)
    got = fn(None, None, 0.0, kt)
    assert torch.allclose(got, want, rtol=1e-8, atol=1e-10)
    plain = predict.gradient_descent_mse(Dense(), y, diag_reg=1e-4, rtol=1e-10,
                                         preconditioner_rank=0)
    assert torch.allclose(plain(None, None, 0.0, kt), want, rtol=1e-8, atol=1e-10)
    assert fn.last.iterations < plain.last.iterations / 2   # the top 25 taken out


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_models(name):
    """The operator runs the model's own autograd on whole blocks: reordered batches, weights
    used elsewhere for some samples, tied heads and hooks give the exact products."""
    model, x = hostile_case(name)
    for mode in ("trace", "full"):
        k = dense(model, x, mode)
        op = torch_ntk.NTKOperator(model, x, mode=mode, batch_size=3)
        v = torch.randn(op.shape[0], 2, dtype=torch.float64)
        assert (op @ v - k @ v).abs().max() <= 1e-12 * float((k @ v).abs().max())


def test_hugging_face_gpt2():
    model, ids, mask = tiny_gpt2(6)
    inputs = {"input_ids": ids, "attention_mask": mask}
    g = torch.Generator().manual_seed(2)

    def output(o):
        return o.logits[:, -1, :3]

    for mode in ("trace", "full"):
        k = dense(model, inputs, mode, output=output)
        op = torch_ntk.NTKOperator(model, inputs, mode=mode, output=output, batch_size=4)
        v = torch.randn(op.shape[0], 2, generator=g, dtype=torch.float64)
        assert (op @ v - k @ v).abs().max() <= 1e-11 * float((k @ v).abs().max())
