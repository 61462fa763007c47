"""
Training a wide network is kernel regression in time
====================================================

Gradient descent on the mean squared error moves a wide network's outputs as the closed-form
kernel dynamics :func:`torch_ntk.predict.gradient_descent_mse` predicts with the network's
empirical NTK at initialisation. This example trains an MLP and its linearization
(:func:`torch_ntk.linearize`) with ``torch.optim.SGD`` and puts their outputs next to the
prediction at the same times, and next to the prediction with the infinite-width kernel
:func:`torch_ntk.analytic_ntk`.
"""

# %%
# Data and network
# ----------------
import matplotlib.pyplot as plt
import torch

import torch_ntk
from torch_ntk.predict import gradient_descent_mse

torch.manual_seed(0)
x_train = torch.linspace(-2, 2, 12, dtype=torch.float64)[:, None]      # (12, 1)
y_train = torch.sin(2 * x_train) + 0.1 * torch.randn_like(x_train)      # (12, 1)
x_test = torch.linspace(-3, 3, 200, dtype=torch.float64)[:, None]      # (200, 1)

depth, b_std = 2, 0.5
net = torch_ntk.NTKMLP(1, 2048, depth=depth, b_std=b_std, dtype=torch.float64)
lin = torch_ntk.linearize(net)          # f(x; θ0) + J(x; θ0)(θ − θ0), a copy of the network

# %%
# The kernel predictions
# ----------------------
# The loss is ``‖f − y‖² / (2 N)``, so with a learning rate ``lr`` one step of gradient descent
# is one unit of time of ``gradient_descent_mse(..., learning_rate=lr)``. Discrete steps follow
# the continuous-time flow closely when ``lr · λ_max / N`` is well below 2; this takes 0.2.
k_train = torch_ntk.empirical_ntk(net, x_train, mode="trace")           # (12, 12), K = 1
k_test = torch_ntk.empirical_ntk(net, x_test, x_train, mode="trace")    # (200, 12)
lr = 0.2 * len(x_train) / float(torch.linalg.eigvalsh(k_train).max())
steps = [0, 50, 200, 600]
t = torch.tensor(steps, dtype=torch.float64)

with torch.no_grad():
    f_train0, f_test0 = net(x_train), net(x_test)
predict = gradient_descent_mse(k_train, y_train, learning_rate=lr)
_, f_test_kernel = predict(t, f_train0, f_test0, k_test)                # (4, 200, 1)

limit = gradient_descent_mse(torch_ntk.analytic_ntk(x_train, depth=depth, b_std=b_std),
                             y_train, learning_rate=lr)
_, f_test_limit = limit(t, f_train0, f_test0,
                        torch_ntk.analytic_ntk(x_test, x_train, depth=depth, b_std=b_std))

# %%
# Training the network and its linearization
# ------------------------------------------
def train(model):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    outputs = []
    for step in range(steps[-1] + 1):
        if step in steps:
            with torch.no_grad():
                outputs.append(model(x_test))
        opt.zero_grad()
        loss = 0.5 * ((model(x_train) - y_train) ** 2).mean()
        loss.backward()
        opt.step()
    return outputs


f_test_net, f_test_lin = train(net), train(lin)
# Distances are relative to how far the prediction has moved from the initial outputs.
for i, step in enumerate(steps[1:], start=1):
    scale = (f_test_kernel[i] - f_test0).norm()
    print(f"step {step:4d}: distance to the empirical-kernel prediction: "
          f"network {float((f_test_net[i] - f_test_kernel[i]).norm() / scale):.4f}, "
          f"linearized {float((f_test_lin[i] - f_test_kernel[i]).norm() / scale):.4f}")

# %%
# The linearized network follows the prediction up to the discretisation error of the steps.
# The network itself starts on it and drifts away by several percent as its own kernel moves
# during training; the drift shrinks as the width grows.
#
# Outputs over time
# -----------------
# Solid: the trained network. Dashed: ``gradient_descent_mse`` with its NTK at
# initialisation. Dotted: the same with the infinite-width kernel Θ∞, from the same start.
fig, axes = plt.subplots(1, len(steps), figsize=(13, 3.4), sharey=True)
for ax, i in zip(axes, range(len(steps))):
    ax.plot(x_test, f_test_net[i], label="network")
    ax.plot(x_test, f_test_kernel[i], "--", label="empirical NTK")
    ax.plot(x_test, f_test_limit[i], ":", label="limit Θ∞")
    ax.plot(x_train, y_train, "k.", label="training data")
    ax.set(title=f"step {steps[i]}", xlabel="x")
axes[0].legend(loc="lower left", fontsize=8)
fig.tight_layout()
plt.show()
