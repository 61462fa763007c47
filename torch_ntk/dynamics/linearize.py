"""linearize(model): the first-order Taylor expansion of a model in its parameters."""
from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call, jvp


def linearize(model: nn.Module) -> nn.Module:
    """Returns the model linearized in its trainable parameters around their current values θ0.

    ``f_lin(x; θ) = f(x; θ0) + J(x; θ0) (θ - θ0)``, evaluated with one forward-mode
    Jacobian-vector product (``torch.func.jvp``), so the Jacobian is never formed. Trained
    by gradient descent on the MSE loss, ``f_lin`` follows exactly the dynamics that
    ``torch_ntk.predict.gradient_descent_mse`` predicts with the empirical NTK at θ0,
    which a wide network approaches (Lee et al. 2019, https://arxiv.org/abs/1902.06720).

    The returned module owns a deep copy of ``model`` (``.module``) whose trainable
    parameters are θ, starting at θ0; ``parameters()`` yields them (plus the frozen ones,
    still frozen), so any ``torch.optim`` optimizer trains it. Buffers are copied and the
    ``training`` flag is kept. The original model is never changed.

    Args:
        model (nn.Module): any module; its parameters with ``requires_grad=True`` are the
            ones linearized (all of them in one dtype and on one device).
    Returns:
        nn.Module: ``f_lin``, called like ``model`` (``(N, *in_shape) -> (N, *out_shape)``);
        positional and keyword inputs are passed through unchanged.
    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``model`` has no parameter with ``requires_grad=True``.
    Example:
        >>> net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))
        >>> lin = linearize(net)
        >>> x = torch.randn(5, 3)
        >>> torch.allclose(lin(x), net(x))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"linearize: model must be a torch.nn.Module, got {type(model).__name__}.")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "linearize: the model has no parameter with requires_grad=True, so there is nothing "
            "to linearize in. Unfreeze the parameters the model should be linear in.")
    return LinearizedModule(model)


class LinearizedModule(nn.Module):
    """``f(x; θ0) + J(x; θ0) (θ - θ0)`` for a copy of a module; build it with ``linearize``.

    Attributes:
        module (nn.Module): the copy; its trainable parameters are θ.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(model)
        self._names = [name for name, p in self.module.named_parameters() if p.requires_grad]
        self._theta0 = nn.Module()  # θ0 as buffers: they follow .to() and state_dict()
        named = dict(self.module.named_parameters())
        for i, name in enumerate(self._names):
            param = named[name]
            param.grad = None
            self._theta0.register_buffer(f"p{i}", param.detach().clone())
        self.training = model.training  # submodules keep their own flags, as in the copy

    def theta0(self) -> dict[str, Tensor]:
        """The expansion point: the trainable parameters' values when linearized, by name."""
        return {name: getattr(self._theta0, f"p{i}") for i, name in enumerate(self._names)}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Evaluates ``f(x; θ0) + J(x; θ0)(θ - θ0)`` (same inputs and output structure as f)."""
        theta0 = self.theta0()
        # Attribute lookup (not named_parameters) also sees tensors swapped in by
        # torch.func.functional_call, so this module can itself be called functionally.
        tangent = {name: _get(self.module, name) - theta0[name] for name in self._names}

        def f(params: dict[str, Tensor]) -> Any:
            return functional_call(self.module, params, args, kwargs)

        out0, dout = jvp(f, (theta0,), (tangent,))
        return _add(out0, dout)


# Internal helpers


def _get(module: nn.Module, name: str) -> Tensor:
    """``module.a.b.c`` for ``name = "a.b.c"``."""
    for part in name.split("."):
        module = getattr(module, part)
    return module


def _add(a: Any, b: Any) -> Any:
    """Adds two outputs of the same structure (tensor, or tuple / list / dict of them)."""
    if isinstance(a, Tensor):
        return a + b
    if isinstance(a, dict):
        return {key: _add(a[key], b[key]) for key in a}
    if isinstance(a, (tuple, list)):
        return type(a)(_add(x, y) for x, y in zip(a, b))
    return a
