"""The benchmark model zoo: seeded models and matching inputs, by name.

- ``mlp``: the MLP 64-512-512-512-10 (ReLU), inputs (N, 64).
- ``cnn``: the CNN of PyTorch's "Neural Tangent Kernels" torch.func tutorial: three 3×3
  convolutions of 32 channels without padding (ReLU after the first two) and a linear layer
  32·26·26 -> 10; inputs (N, 3, 32, 32).
- ``transformer``: Embedding(100, 64), a 2-layer TransformerEncoder (d = 64, 4 heads,
  feed-forward 128, dropout 0, batch-first), mean pooling over T = 16 tokens, Linear(64, 10);
  integer token inputs (N, 16).
- ``transformer-30k``: the same with a 30,000-token vocabulary (an Embedding of 1.92 M
  parameters, most of the model, as in real language models).
- ``resnet18``: torchvision's ResNet-18 with 10 classes (eval mode, BatchNorm running stats);
  inputs (N, 3, 32, 32). Needs torchvision.
- ``gru``: a 1-layer GRU (8 features, hidden 64, batch-first) over T = 16 steps and a
  Linear(64, 10) head on the last hidden state; inputs (N, 16, 8).

All models are in eval mode with K = 10 outputs.
"""
from __future__ import annotations

import torch
from torch import nn

MLP_WIDTHS = (64, 512, 512, 512, 10)
MODELS = ("mlp", "cnn", "transformer", "transformer-30k", "resnet18", "gru")
K = 10
# Default numbers of inputs per model (resnet18 is slow: every method forms large Jacobians).
DEFAULT_SIZES = {"mlp": (32, 128), "cnn": (32, 128), "transformer": (32, 128),
                 "transformer-30k": (32, 64), "resnet18": (8, 16), "gru": (32, 128)}
_VOCAB, _BIG_VOCAB, _TOKENS, _GRU_FEATURES = 100, 30_000, 16, 8


class TutorialCNN(nn.Module):
    """The CNN of the torch.func NTK tutorial (32×32×3 inputs, 10 outputs)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, (3, 3))
        self.conv2 = nn.Conv2d(32, 32, (3, 3))
        self.conv3 = nn.Conv2d(32, 32, (3, 3))
        self.fc = nn.Linear(32 * 26 * 26, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).relu()
        x = self.conv2(x).relu()
        x = self.conv3(x)
        return self.fc(x.flatten(1))


class TinyTransformer(nn.Module):
    """Token embedding, a 2-layer encoder, mean pooling and a linear head."""

    def __init__(self, vocab: int = _VOCAB, d: int = 64, heads: int = 4, ff: int = 128,
                 layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=ff, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, K)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


class GRUClassifier(nn.Module):
    """A 1-layer batch-first GRU and a linear head on its last hidden state."""

    def __init__(self, features: int = _GRU_FEATURES, hidden: int = 64):
        super().__init__()
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(x)
        return self.head(h[-1])


def mlp(dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """The benchmark MLP 64-512-512-512-10, seeded."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(MLP_WIDTHS[:-1], MLP_WIDTHS[1:])):
        layers += [nn.Linear(n_in, n_out)] + ([nn.ReLU()] if i < len(MLP_WIDTHS) - 2 else [])
    return nn.Sequential(*layers).to(device=device, dtype=dtype)


def build(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """The zoo model ``name``, seeded, in eval mode.

    Raises:
        ValueError: unknown name.
        ImportError: ``resnet18`` without torchvision.
    """
    if name == "mlp":
        return mlp(dtype, device).eval()
    torch.manual_seed(0)
    if name == "cnn":
        model: nn.Module = TutorialCNN()
    elif name == "transformer":
        model = TinyTransformer()
    elif name == "transformer-30k":
        model = TinyTransformer(vocab=_BIG_VOCAB)
    elif name == "resnet18":
        model = _resnet18()
    elif name == "gru":
        model = GRUClassifier()
    else:
        raise ValueError(f"unknown benchmark model {name!r}; expected one of {MODELS}")
    return model.to(device=device, dtype=dtype).eval()


def inputs(name: str, n: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
           seed: int = 1) -> torch.Tensor:
    """N seeded inputs for the zoo model ``name`` (integer tokens for the transformer)."""
    g = torch.Generator().manual_seed(seed)
    if name in ("transformer", "transformer-30k"):
        vocab = _VOCAB if name == "transformer" else _BIG_VOCAB
        return torch.randint(0, vocab, (n, _TOKENS), generator=g).to(device)
    shape = {"mlp": (MLP_WIDTHS[0],), "cnn": (3, 32, 32), "resnet18": (3, 32, 32),
             "gru": (_TOKENS, _GRU_FEATURES)}
    if name not in shape:
        raise ValueError(f"unknown benchmark model {name!r}; expected one of {MODELS}")
    return torch.randn(n, *shape[name], generator=g).to(device=device, dtype=dtype)


def describe(name: str) -> str:
    """One line: the model and its parameter count."""
    p = sum(q.numel() for q in build(name).parameters())
    text = {"mlp": f"MLP {'-'.join(map(str, MLP_WIDTHS))} (ReLU)",
            "cnn": "tutorial CNN 3x[Conv2d 3x3, 32] + Linear(21632, 10), 3x32x32 inputs",
            "transformer": "Embedding(100, 64) + 2-layer TransformerEncoder(64, 4 heads, "
                           "ff 128) + mean pool + Linear(64, 10), T=16 tokens",
            "transformer-30k": "the transformer with Embedding(30000, 64)",
            "resnet18": "torchvision resnet18(num_classes=10), eval, 3x32x32 inputs",
            "gru": "GRU(8, 64) over T=16 + Linear(64, 10)"}[name]
    return f"{text}, P={p}"


def torchvision_missing() -> str | None:
    """Why resnet18 cannot be built (torchvision not importable), or None."""
    try:
        import torchvision  # noqa: F401
    except ImportError as err:
        return f"torchvision is not installed ({err})"
    return None


# Internal helpers

def _resnet18() -> nn.Module:
    reason = torchvision_missing()
    if reason:
        raise ImportError(f"resnet18 needs torchvision: {reason}")
    from torchvision.models import resnet18
    return resnet18(num_classes=K)
