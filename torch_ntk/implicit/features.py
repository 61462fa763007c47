"""ntk_features(): random features whose inner products estimate the empirical NTK."""
from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from torch_ntk.empirical import checks
from torch_ntk.empirical.api import KernelPlan
from torch_ntk.implicit.sketch import Hashes, sketch_factors


def ntk_features(model: nn.Module, x, dim: int, *, seed: int = 0, params=None, output=None,
                 batch_size: int | None = None, out: Tensor | None = None) -> Tensor:
    """Random features φ of the empirical NTK: ``E[φ(x)_a · φ(x')_b] = Θ(x, x')_ab``.

    φ(x)_a is a count sketch of the per-sample gradient ``∂f_a(x)/∂θ`` into ``dim`` buckets,
    computed from the structured method's factors: a Linear or Conv layer's share is sketched
    from its inputs and output gradients (an FFT per position, over sequences and image
    positions too), never as a ``q × p`` gradient, so memory is ``O(N·K·dim)`` plus the
    model's activations of one block. The estimate is
    unbiased for every ``dim``; its relative error falls as ``dim^-1/2``. The hashes depend only
    on ``seed``, ``dim`` and the parameters' names and shapes, so features of batches computed
    separately (or on other machines) with the same seed live in one space. Every block passes
    the same checks as ``empirical_ntk`` (exact factors on every sample, or a clear error).

    Args:
        model (nn.Module): as for ``empirical_ntk``; left as it was.
        x (Tensor[N, *in_shape], tuple or dict): inputs, as ``x1`` of ``empirical_ntk``.
        dim (int): features per output.
        seed (int): fixes the sketch.
        params, output, batch_size: as for ``empirical_ntk``.
        out (Tensor[N, K, dim], optional): filled and returned (any device, the model's dtype).

    Returns:
        Tensor[N, K, dim]: the model's dtype, on x's device (or ``out``).

    Example:
        >>> phi = torch_ntk.ntk_features(model, x, 4096)
        >>> k_approx = torch.einsum("nad,mbd->nmab", phi, phi)   # ≈ empirical_ntk(model, x)
    """
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
        raise ValueError(f"ntk_features: dim must be a positive int, got {dim!r}.")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"ntk_features: seed must be an int, got {seed!r}.")
    with KernelPlan(model, x, None, mode="full", batch_size=batch_size, params=params,
                    output=output, sketch=True) as plan:
        names = plan.user_names()
        shapes = {names[n]: p.shape for n, p in plan.params.items()}
        hashes = Hashes(shapes, int(dim), int(seed), plan.x1.device)
        shape = (plan.shape[0], plan.k, int(dim))
        checks.check_out(out, shape, plan.dtype, inputs=(plan.x1,), model=plan.model)
        result = torch.empty(shape, dtype=plan.dtype, device=plan.x1.device) if out is None else out
        for i, rows in enumerate(plan.rows):
            with torch.no_grad():
                result[rows] = sketch_factors(plan.block_factors(i), hashes, names)
        if out is not None:
            torch.autograd.graph.increment_version(out)
    return result
