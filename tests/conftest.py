"""Shared fixtures: devices, dtypes, per-dtype tolerances and a small model zoo."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torch_ntk

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}


def assert_close(actual, expected, dtype, msg=""):
    """Relative comparison scaled by the largest entry of ``expected``."""
    tol = TOL[dtype]
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1.0),
                               msg=lambda m: f"{msg}: {m}")


def autograd_jacobian(model: nn.Module, x: torch.Tensor, names=None) -> torch.Tensor:
    """(N, K, P) by plain autograd: each sample alone, one output at a time, over the
    parameters with requires_grad (or those ``names``)."""
    named = dict(model.named_parameters(remove_duplicate=False))
    params = ([p for p in model.parameters() if p.requires_grad] if names is None
              else [named[n] for n in names])
    rows = []
    for xi in x:
        f = model(xi.unsqueeze(0)).reshape(-1)
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            fa, params, retain_graph=True, allow_unused=True, materialize_grads=True)])
            for fa in f]))
    return torch.stack(rows)


def autograd_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor,
                 names=None) -> torch.Tensor:
    """(N1, N2, K, K) from the reference Jacobians (over ``names`` when given)."""
    return torch.einsum("nap,mbp->nmab", autograd_jacobian(model, x1, names),
                        autograd_jacobian(model, x2, names))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class Residual(nn.Module):
    def __init__(self, width: int, act: nn.Module) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(width, width), act, nn.Linear(width, width))

    def forward(self, x):
        return x + self.inner(x)


class ResidualMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(5, 6)
        self.blocks = nn.Sequential(Residual(6, nn.GELU()), Residual(6, nn.SiLU()))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.blocks(self.stem(x))))


class ScalarHead(nn.Module):
    """Returns (N,): K = 1."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 9), nn.Softplus(), nn.Linear(9, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


class SequenceModel(nn.Module):
    """Linear layers over tokens (N, T, d), a shared layer called twice, mean pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.mix = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        x = x.reshape(x.shape[0], 3, 4)
        h = torch.tanh(self.proj(x))
        h = self.norm(h + self.mix(torch.relu(self.mix(h))))
        return self.head(h.mean(1))


class ConvNet2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 2, stride=2, dilation=1, groups=1, bias=False)
        self.conv3 = nn.Conv2d(4, 4, 3, padding="same", groups=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = x.reshape(x.shape[0], 2, 5, 5)
        h = torch.relu(self.conv1(x))
        h = torch.tanh(self.conv3(self.conv2(h)))
        return self.head(self.pool(h).flatten(1))


class ConvNet1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, 3, 3, stride=2, padding=2, dilation=2)
        self.conv2 = nn.Conv1d(3, 2, 2, padding="same")
        self.head = nn.Linear(2 * 3, 4)

    def forward(self, x):
        x = x.reshape(x.shape[0], 2, 5)
        h = torch.nn.functional.elu(self.conv1(x))
        h = self.conv2(h)
        return self.head(h.flatten(1))


class EmbeddingModel(nn.Module):
    """Integer inputs; the Embedding goes through the Jacobian path."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.head = nn.Linear(8, 3)

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx).flatten(1)))


class RecurrentModel(nn.Module):
    """nn.RNN/GRU/LSTM (input 3, hidden 5) and a Linear head to 2 outputs on the time mean.

    Takes (N, T, 3) either way; a sequence-first RNN gets the input transposed, so the batch
    stays on dim 0 of the model's input. torch.func.vmap can't run these RNNs.
    """

    def __init__(self, cell: type, batch_first: bool = True, **kwargs) -> None:
        super().__init__()
        self.rnn = cell(3, 5, batch_first=batch_first, **kwargs)
        self.head = nn.Linear(5 * (2 if self.rnn.bidirectional else 1), 2)

    def forward(self, x):
        if not self.rnn.batch_first:
            x = x.transpose(0, 1)
        y, _ = self.rnn(x)
        return self.head(y.mean(1 if self.rnn.batch_first else 0))


def _sequences(n: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(n, 4, 3, dtype=dtype)


def _mlp(act: nn.Module, out: int = 3, bias: bool = True) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8, bias=bias), act, nn.Linear(8, 7, bias=bias),
                         act, nn.Linear(7, out, bias=bias))


def _frozen() -> nn.Module:
    model = _mlp(nn.Tanh())
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    model[4].requires_grad_(False)
    return model


def _layernorm(affine: bool) -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8, elementwise_affine=affine), nn.ReLU(),
                         nn.Linear(8, 4))


def _ntk_mlp() -> nn.Module:
    return nn.Sequential(torch_ntk.NTKLinear(5, 16, weight_scale=0.7, bias_scale=0.3),
                         nn.ReLU(inplace=True),
                         torch_ntk.NTKLinear(16, 2, weight_scale=0.25, bias_scale=0.1))


# name -> (model factory, input factory (n, dtype) -> Tensor)
ZOO = {
    "mlp_relu": (lambda: _mlp(nn.ReLU()), None),
    "mlp_relu_inplace": (lambda: _mlp(nn.ReLU(inplace=True)), None),
    "mlp_tanh": (lambda: _mlp(nn.Tanh()), None),
    "mlp_gelu": (lambda: _mlp(nn.GELU()), None),
    "mlp_sigmoid": (lambda: _mlp(nn.Sigmoid()), None),
    "mlp_no_bias": (lambda: _mlp(nn.SiLU(), bias=False), None),
    "mlp_k10": (lambda: _mlp(nn.Softplus(), out=10), None),
    "residual": (ResidualMLP, None),
    "layernorm_affine": (lambda: _layernorm(True), None),
    "layernorm_plain": (lambda: _layernorm(False), None),
    "frozen": (_frozen, None),
    "scalar_output": (ScalarHead, None),
    "sequence": (SequenceModel, lambda n, dt: torch.randn(n, 12, dtype=dt)),
    "conv1d": (ConvNet1d, lambda n, dt: torch.randn(n, 10, dtype=dt)),
    "conv2d": (ConvNet2d, lambda n, dt: torch.randn(n, 50, dtype=dt)),
    "embedding": (EmbeddingModel, lambda n, dt: torch.randint(0, 11, (n, 2))),
    "ntk_linear": (_ntk_mlp, None),
    "rnn_two_layers_seq_first": (lambda: RecurrentModel(nn.RNN, False, num_layers=2),
                                 _sequences),
    "gru_bidirectional": (lambda: RecurrentModel(nn.GRU, True, bidirectional=True), _sequences),
    "lstm_bidirectional_seq_first": (lambda: RecurrentModel(nn.LSTM, False, bidirectional=True),
                                     _sequences),
}


def make(name: str, dtype: torch.dtype, n1: int, n2: int):
    """Model of the zoo in ``dtype`` and two input batches (N1, ...), (N2, ...)."""
    factory, inputs = ZOO[name]
    model = factory().to(dtype)
    inputs = inputs or (lambda n, dt: torch.randn(n, 5, dtype=dt))
    return model, inputs(n1, dtype), inputs(n2, dtype)
