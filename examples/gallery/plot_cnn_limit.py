"""
The infinite-width kernel of a convolutional network
====================================================

``analytic_ntk(model, x)`` reads a module built from NTK layers (here
:class:`torch_ntk.NTKConv2d` and :class:`torch_ntk.NTKLinear`, with ReLU and average pooling)
and returns its kernel in the limit of infinitely many channels. The empirical NTK of the
same module, divided by its number of outputs, approaches it as the channels grow. Inputs are
scikit-learn's bundled 8×8 handwritten digits (no download).
"""

# %%
# The network and the data
# ------------------------
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

import torch_ntk


def cnn(channels):
    conv = lambda c_in, c_out: torch_ntk.NTKConv2d(c_in, c_out, 3, padding="same")
    return nn.Sequential(conv(1, channels), nn.ReLU(), conv(channels, channels), nn.ReLU(),
                         nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         torch_ntk.NTKLinear(channels, 10, w_std=1.0)).double()


digits = load_digits()
order = digits.target.argsort(kind="stable")[::45]           # 40 digits, sorted by label
x = torch.tensor(digits.images[order], dtype=torch.float64)[:, None] / 16   # (40, 1, 8, 8)
x = x - x.mean()
labels = digits.target[order]

theta_inf = torch_ntk.analytic_ntk(cnn(8), x)                # (40, 40); channels don't matter

# %%
# Empirical kernels with more and more channels
# ---------------------------------------------
# Two random initialisations per channel count; the error is their mean.
channels = [8, 32, 128]
errors = []
for c in channels:
    runs = []
    for seed in range(2):
        torch.manual_seed(seed)
        theta = torch_ntk.empirical_ntk(cnn(c), x, mode="trace") / 10   # per output
        runs.append(float((theta - theta_inf).norm() / theta_inf.norm()))
    errors.append(sum(runs) / len(runs))
    print(f"{c:4d} channels: relative distance to the limit {errors[-1]:.3f}")

# %%
# The limit as an image, and the distance to it
# ---------------------------------------------
# Left: the limit normalised to a unit diagonal, ``Θ∞(x, x') / sqrt(Θ∞(x, x) Θ∞(x', x'))``,
# on the digits sorted by label. Right: the empirical kernels' distance to the limit.
norm = theta_inf.diagonal().sqrt()
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
image = left.imshow(theta_inf / norm[:, None] / norm[None, :], cmap="viridis")
ticks = [list(labels).index(d) for d in range(10)]
left.set_xticks(ticks, range(10))
left.set_yticks(ticks, range(10))
left.set(title="normalised Θ∞ on 40 digits, sorted by label")
fig.colorbar(image, ax=left)
right.loglog(channels, errors, "o-", label="empirical NTK / 10")
right.loglog(channels, [errors[0] * (c / channels[0]) ** -0.5 for c in channels], "k:",
             label="channels^(-1/2)")
right.set(xlabel="channels", ylabel="‖Θ − Θ∞‖ / ‖Θ∞‖", title="distance to the limit")
right.legend()
fig.tight_layout()
plt.show()
