"""
The empirical NTK converges to its infinite-width limit
=======================================================

An NTK-parameterised MLP (:class:`torch_ntk.NTKMLP`) has a random empirical kernel at
initialisation; as its width grows, the kernel concentrates around the deterministic limit
:func:`torch_ntk.analytic_ntk` of Jacot et al. (2018), with a relative error that shrinks like
``width ** -0.5``.
"""

# %%
# Inputs on the unit circle
# -------------------------
# The kernel between ``x0 = (1, 0)`` and points ``x(γ) = (cos γ, sin γ)`` of the circle is a
# function of the angle γ only, which makes it easy to plot.
import math

import matplotlib.pyplot as plt
import torch

import torch_ntk

torch.manual_seed(0)
gamma = torch.linspace(-math.pi, math.pi, 65, dtype=torch.float64)
x = torch.stack([gamma.cos(), gamma.sin()], dim=1)                 # (65, 2)
depth, b_std = 4, 0.1

theta_inf = torch_ntk.analytic_ntk(x, depth=depth, b_std=b_std)    # (65, 65)

# %%
# Empirical kernels of networks of growing width
# ----------------------------------------------
# With one output, ``mode="trace"`` is the kernel itself. Each width is drawn with a few
# seeds; the error is the relative Frobenius distance to the limit.
widths = [32, 128, 512, 2048]
seeds = 3
errors, rows = {}, {}
for width in widths:
    errors[width] = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        net = torch_ntk.NTKMLP(2, width, depth=depth, b_std=b_std, dtype=torch.float64)
        theta = torch_ntk.empirical_ntk(net, x, mode="trace")       # (65, 65)
        errors[width].append(float((theta - theta_inf).norm() / theta_inf.norm()))
        if seed == 0:
            rows[width] = theta[len(gamma) // 2]                    # Θ(x0, x(γ))
    print(f"width {width:5d}: relative error {sum(errors[width]) / seeds:.3f}")

# %%
# The kernel along the circle, and the error against the width
# -------------------------------------------------------------
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
for width in (widths[0], widths[-1]):
    left.plot(gamma, rows[width], label=f"width {width}")
left.plot(gamma, theta_inf[len(gamma) // 2], "k--", label="limit Θ∞")
left.set(xlabel="γ", ylabel="Θ(x0, x(γ))", title="kernel along the circle")
left.legend()

mean = [sum(errors[w]) / seeds for w in widths]
right.loglog(widths, mean, "o-", label="mean over seeds")
right.loglog(widths, [mean[0] * (w / widths[0]) ** -0.5 for w in widths], "k:",
             label="width^(-1/2)")
right.set(xlabel="width", ylabel="‖Θ − Θ∞‖ / ‖Θ∞‖", title="distance to the limit")
right.legend()
fig.tight_layout()
plt.show()
