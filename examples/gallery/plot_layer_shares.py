"""
Which layers carry the kernel
=============================

``empirical_ntk(..., by_layer=True)`` returns the kernel over each module's own parameters,
and these kernels sum to the whole one. The share of a layer in the kernel's trace tells how
much of the function's sensitivity to its parameters that layer holds. This example compares
a small convolutional network at initialisation in the standard parameterisation (PyTorch's
default layers) with the same architecture in the NTK parameterisation.
"""

# %%
# Two networks, one architecture
# ------------------------------
import matplotlib.pyplot as plt
import torch
from torch import nn

import torch_ntk


def standard():
    return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def ntk_parameterised():
    conv = lambda c_in, c_out: torch_ntk.NTKConv2d(c_in, c_out, 3, padding="same", b_std=0.1)
    return nn.Sequential(conv(1, 32), nn.ReLU(), conv(32, 32), nn.ReLU(), nn.AvgPool2d(2),
                         conv(32, 32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         torch_ntk.NTKLinear(32, 10, w_std=1.0, b_std=0.1))


torch.manual_seed(0)
x = torch.randn(32, 1, 12, 12)                                          # (N, C, H, W)

# %%
# Per-layer kernels
# -----------------
# ``mode="trace"`` gives one (N, N) kernel per module; the share of a module is its part of the
# mean diagonal.
shares = {}
for label, make in [("standard", standard), ("NTK", ntk_parameterised)]:
    model = make()
    parts = torch_ntk.empirical_ntk(model, x, mode="trace", by_layer=True)  # {name: (32, 32)}
    whole = torch_ntk.empirical_ntk(model, x, mode="trace")
    assert torch.allclose(sum(parts.values()), whole, rtol=1e-4, atol=1e-5 * whole.abs().max())
    total = float(whole.diagonal().mean())
    shares[label] = {name: float(k.diagonal().mean()) / total for name, k in parts.items()}
    print(label, {name: f"{share:.1%}" for name, share in shares[label].items()})

# %%
# In both networks the share grows with depth and the dense head holds the largest part. The
# first convolution holds far less of the kernel with PyTorch's default layers than in the NTK
# parameterisation, where every layer is scaled by ``w_std / sqrt(fan_in)`` in its forward.
names = list(shares["standard"])
fig, ax = plt.subplots(figsize=(7, 3.5))
width = 0.4
for i, label in enumerate(shares):
    ax.bar([j + (i - 0.5) * width for j in range(len(names))],
           [shares[label][n] for n in names], width, label=label)
ax.set_xticks(range(len(names)), [f"module {n}" for n in names])
ax.set(ylabel="share of the kernel's trace", title="per-layer NTK at initialisation")
ax.legend()
fig.tight_layout()
plt.show()
