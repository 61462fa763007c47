"""Full-batch gradient descent on the MSE loss that records the NTK, outputs and loss.

The discrete counterpart of ``torch_ntk.predict.gradient_descent_mse``: after S steps of size
``learning_rate`` a network trained here is compared with that prediction at ``t = S``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from torch_ntk.empirical import empirical_ntk

__all__ = ["TrainingRecord", "train_mse"]


@dataclass
class TrainingRecord:
    """What ``train_mse`` recorded; tensors are on the CPU.

    Attributes:
        steps (list[int]): the R recorded steps, ascending.
        loss (Tensor[S + 1]): loss before each of the S updates and after the last one.
        fx_train (Tensor[R, N, *out_shape]): outputs on the training inputs at each recorded step.
        fx_test (Tensor[R, M, *out_shape] or None): outputs on ``x_test``.
        ntk (Tensor[R, N_k, N_k, ...] or None): ``empirical_ntk(model, x_ntk, mode=ntk_mode)``.
        seconds (float): wall time of the whole run.
    """

    steps: list[int]
    loss: Tensor
    fx_train: Tensor
    fx_test: Tensor | None = None
    ntk: Tensor | None = None
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def train_mse(model: nn.Module, x_train: Tensor, y_train: Tensor, *, steps: int,
              learning_rate: float, record_steps: Iterable[int] | None = None,
              x_test: Tensor | None = None, x_ntk: Tensor | None = None,
              ntk_mode: str = "trace", ntk_method: str = "auto",
              callback: Callable[[int, float], None] | None = None) -> TrainingRecord:
    """Full-batch gradient descent on ``L = ||f(x_train) - y_train||² / (2 · y_train.numel())``.

    This is the discrete version of the dynamics ``torch_ntk.predict.gradient_descent_mse``
    solves: after S steps of size ``learning_rate``, compare with its ``t = S`` (same
    ``learning_rate``). The model is trained in place with ``torch.optim.SGD``, on the device
    of its parameters; inputs are moved there.

    Args:
        model (nn.Module): maps Tensor[N, *in_shape] to Tensor[N, *out_shape].
        x_train (Tensor[N, *in_shape]), y_train (Tensor[N, *out_shape]): training set.
        steps (int): number S of gradient-descent updates.
        learning_rate (float): step size.
        record_steps (iterable of int, optional): steps in ``[0, S]`` at which to record
            outputs and the NTK (before that step's update; S means after the last update).
            Defaults to ``(0, S)``.
        x_test (Tensor[M, *in_shape], optional): inputs whose outputs are recorded too.
        x_ntk (Tensor[N_k, *in_shape], optional): inputs of the recorded empirical NTK.
        ntk_mode (str), ntk_method (str): passed to ``torch_ntk.empirical_ntk``.
        callback (callable, optional): called as ``callback(step, loss)`` after each update.
    Returns:
        TrainingRecord: the recorded steps, losses, outputs and kernels.
    Raises:
        ValueError: ``steps`` < 0, a record step outside ``[0, steps]``, or ``y_train`` not of
            the model's output shape.
    Example:
        >>> net = torch_ntk.NTKMLP(2, 256, 3)
        >>> x, y = torch.randn(4, 2), torch.randn(4, 1)
        >>> rec = train_mse(net, x, y, steps=50, learning_rate=1.0, x_ntk=x)
        >>> rec.ntk.shape
        torch.Size([2, 4, 4])
    """
    if steps < 0:
        raise ValueError(f"train_mse: steps must be >= 0, got {steps}.")
    wanted = sorted(set(int(s) for s in (record_steps if record_steps is not None
                                        else (0, steps))))
    if wanted and (wanted[0] < 0 or wanted[-1] > steps):
        raise ValueError(f"train_mse: record_steps must lie in [0, {steps}], got {wanted}.")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    x_train, y_train = x_train.to(device), y_train.to(device=device, dtype=dtype)
    x_test = None if x_test is None else x_test.to(device)
    x_ntk = None if x_ntk is None else x_ntk.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=learning_rate)
    scale = 1.0 / (2 * y_train.numel())
    losses, f_train, f_test, kernels = [], [], [], []
    start = time.perf_counter()
    for step in range(steps + 1):
        record = step in wanted
        if record:  # before this step's forward pass, whose graph must stay intact
            if x_ntk is not None:
                kernels.append(empirical_ntk(model, x_ntk, mode=ntk_mode,
                                          method=ntk_method).cpu())
            if x_test is not None:
                with torch.no_grad():
                    f_test.append(model(x_test).cpu())
        optimizer.zero_grad(set_to_none=True)
        out = model(x_train)
        if out.shape != y_train.shape:
            raise ValueError(f"train_mse: the model maps x_train to shape {tuple(out.shape)} "
                             f"but y_train has shape {tuple(y_train.shape)}.")
        loss = (out - y_train).square().sum() * scale
        losses.append(loss.detach())
        if record:
            f_train.append(out.detach().cpu())
        if step == steps:
            break
        loss.backward()
        optimizer.step()
        if callback is not None:
            callback(step + 1, loss.item())
    optimizer.zero_grad(set_to_none=True)
    return TrainingRecord(
        steps=wanted, loss=torch.stack(losses).cpu(), fx_train=torch.stack(f_train),
        fx_test=torch.stack(f_test) if f_test else None,
        ntk=torch.stack(kernels) if kernels else None, seconds=time.perf_counter() - start)

