"""Training dynamics of gradient descent given a kernel, and Gaussian-process inference.

``gradient_descent_mse`` (closed form, in ``_mse``), ``gradient_descent`` (any loss, numerical
ODE integration, in ``_ode``), ``gp_inference`` (NNGP posterior and NTK ensemble at t = ∞) and
``gradient_descent_mse_ensemble`` (the infinite ensemble's mean and covariance at any t; both
in ``_gp``, with ``Gaussian``). Argument checks shared by all of them are in ``_checks``.

For a model trained by continuous-time gradient descent on
``L = ||f(X) - Y||² / (2 · Y.numel())`` with learning rate ``lr``, the outputs on
the training inputs follow (Jacot et al. 2018, https://arxiv.org/abs/1806.07572, §5-6)

    d f_train / dt = -lr / Y.numel() · Θ(X, X) (f_train - Y)

and any other input follows ``d f_test / dt = -lr / Y.numel() · Θ(x, X) (f_train - Y)``.
With a constant kernel (the infinite-width limit, or a linearized model) this is
solved exactly in the eigenbasis of ``Θ(X, X)``; at ``t = ∞`` it is kernel
regression. The conventions (time in units of ``learning_rate``, the ``Y.numel()``
normalisation, relative ``diag_reg``) are those of neural-tangents'
``predict.gradient_descent_mse`` with its default ``trace_axes=(-1,)``.
"""
from torch_ntk.dynamics._gp import Gaussian, gp_inference, gradient_descent_mse_ensemble
from torch_ntk.dynamics._mse import gradient_descent_mse
from torch_ntk.dynamics._ode import gradient_descent

__all__ = ["Gaussian", "gradient_descent", "gradient_descent_mse",
           "gradient_descent_mse_ensemble", "gp_inference"]

# The public names are documented (and pickled) as members of this module.
for _obj in (Gaussian, gp_inference, gradient_descent, gradient_descent_mse,
             gradient_descent_mse_ensemble):
    _obj.__module__ = __name__
del _obj
