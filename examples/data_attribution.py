"""TRAK-style data attribution from random NTK features, checked against the exact kernel.

    python examples/data_attribution.py --train 1000 --dims 256 1024 4096

A small MLP is trained on scikit-learn's digits. The function attributed is each sample's
correct-class margin ``m(x, y) = z_y - logsumexp_{c != y} z_c`` (as in TRAK, Park et al. 2023),
with the sample's label passed as a second input. With φ its NTK features (``ntk_features``)
and ``Q = diag(1 - p_y)`` over the training points, the score of training point j for test
point i is

    τ_ij = φ(x_i) (Φᵀ Φ + λ I)⁻¹ φ(x_j)ᵀ Q_jj,

a ridge solve in feature space (``dim × dim``, never ``N × N``). The same scores from the exact
kernel, ``[Θ_test,train (Θ_train + λ I)⁻¹]_ij Q_jj``, check them: the script prints, per dim,
the correlation of the two score matrices and how often the training points with the highest
scores share the test point's label.

Needs scikit-learn. ``--out scores.png`` plots the top training images of a few test digits
(needs matplotlib).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import torch_ntk


class Margin(nn.Module):
    """The correct-class margin of a classifier: ``model(x)[y] - logsumexp(others)``, (N, 1)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, y):
        logits = self.model(x)
        correct = logits.gather(1, y[:, None])
        others = logits.scatter(1, y[:, None], float("-inf"))
        return correct - torch.logsumexp(others, dim=1, keepdim=True)


def digits(n_train: int, n_test: int, seed: int):
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float64) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, test = order[:n_train], order[n_train:n_train + n_test]
    return x[train], y[train], x[test], y[test]


def train_classifier(x, y, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10)).double()
    optim = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            optim.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optim.step()
    return model.eval()


def scores_from_kernel(k_test_train, k_train, q, ridge):
    """[Θ_test,train (Θ_train + λ I)⁻¹] diag(q): (M, N)."""
    eye = torch.eye(k_train.shape[0], dtype=k_train.dtype)
    return torch.linalg.solve(k_train + ridge * eye, k_test_train.T).T * q


def scores_from_features(phi_test, phi_train, q, ridge):
    """φ_test (Φᵀ Φ + λ I)⁻¹ Φᵀ diag(q): (M, N), a dim × dim solve."""
    gram = phi_train.T @ phi_train
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + ridge * eye, phi_test.T).T @ phi_train.T * q


def label_agreement(scores, y_train, y_test, top: int = 5) -> float:
    """Share of each test point's top-scored training points that have its label."""
    best = scores.topk(top, dim=1).indices
    return float((y_train[best] == y_test[:, None]).double().mean())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="plot the top training images here")
    args = parser.parse_args(argv)

    x, y, xt, yt = digits(args.train, args.test, args.seed)
    model = train_classifier(x, y, args.epochs, args.seed)
    with torch.no_grad():
        accuracy = float((model(xt).argmax(1) == yt).double().mean())
        q = 1 - torch.softmax(model(x), dim=1).gather(1, y[:, None])[:, 0]
    print(f"classifier: {sum(p.numel() for p in model.parameters())} parameters, "
          f"test accuracy {accuracy:.3f}")
    margin = Margin(model)

    start = time.perf_counter()
    k_train = torch_ntk.empirical_ntk(margin, (x, y), mode="trace")
    k_test = torch_ntk.empirical_ntk(margin, (xt, yt), (x, y), mode="trace")
    ridge = 1e-2 * float(k_train.diagonal().mean())
    exact = scores_from_kernel(k_test, k_train, q, ridge)
    print(f"exact kernel ({args.train}x{args.train}): {time.perf_counter() - start:.2f} s, "
          f"top-5 label agreement {label_agreement(exact, y, yt):.3f}")
    print(f"{'dim':>6} {'seconds':>8} {'corr. with exact':>17} {'top-5 label agreement':>22}")
    for dim in args.dims:
        start = time.perf_counter()
        phi = torch_ntk.ntk_features(margin, (x, y), dim, seed=args.seed)[:, 0]
        phi_t = torch_ntk.ntk_features(margin, (xt, yt), dim, seed=args.seed)[:, 0]
        approx = scores_from_features(phi_t, phi, q, ridge)
        seconds = time.perf_counter() - start
        corr = float(torch.corrcoef(torch.stack([approx.flatten(), exact.flatten()]))[0, 1])
        print(f"{dim:>6} {seconds:>8.2f} {corr:>17.3f} {label_agreement(approx, y, yt):>22.3f}")
    if args.out:
        plot(args.out, approx, x, y, xt, yt)


def plot(path: str, scores, x, y, xt, yt, rows: int = 4, top: int = 5) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, top + 1, figsize=(1.6 * (top + 1), 1.7 * rows))
    for i in range(rows):
        axes[i, 0].imshow(xt[i].reshape(8, 8), cmap="gray_r")
        axes[i, 0].set_title(f"test: {int(yt[i])}", fontsize=9)
        for j, idx in enumerate(scores[i].topk(top).indices):
            axes[i, j + 1].imshow(x[idx].reshape(8, 8), cmap="gray_r")
            axes[i, j + 1].set_title(f"{int(y[idx])}: {float(scores[i, idx]):.2g}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("training digits with the highest attribution scores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
