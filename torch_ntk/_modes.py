"""The kernel modes, their output shapes and the symmetry of a kernel: one place for each.

``k[n, m, a, b] = Θ(x1[n], x2[m])_ab``; ``"full"`` keeps the K×K blocks, ``"trace"`` sums
``a = b``, ``"diagonal"`` keeps ``a = b``. ``Θ(x, x') = Θ(x', x)ᵀ``, so a kernel of a batch with
itself is symmetric under swapping ``(n, a)`` with ``(m, b)``.
"""
from __future__ import annotations

import torch
from torch import Tensor

MODES = ("full", "trace", "diagonal")
# What empirical_ntk takes besides: the pseudo-NTK, (1/K) Σ_ab Θ_ab, computed as the trace of
# the single output Σ_a f_a / sqrt(K).
USER_MODES = MODES + ("pntk",)


def kernel_shape(n1: int, n2: int, k: int, mode: str) -> tuple[int, ...]:
    """Output shape: ``(N1, N2, K, K)`` full, ``(N1, N2)`` trace, ``(N1, N2, K)`` diagonal."""
    return (n1, n2) + {"full": (k, k), "trace": (), "diagonal": (k,)}[mode]


def kernel_dims(mode: str) -> int:
    """Number of dimensions of a kernel in ``mode``."""
    return {"full": 4, "trace": 2, "diagonal": 3}[mode]


def entries_per_pair(k: int, mode: str) -> int:
    """Kernel entries per pair of inputs."""
    return {"full": k * k, "trace": 1, "diagonal": k}[mode]


def transpose(tile: Tensor, mode: str) -> Tensor:
    """Θ(x', x) from Θ(x, x'): swap the batch axes (and the output axes in full mode)."""
    return tile.permute(1, 0, 3, 2) if mode == "full" else tile.transpose(0, 1)


def mirror_upper(kernel: Tensor, mode: str) -> Tensor:
    """Copies the upper triangle of a square kernel onto its lower one (exactly symmetric).

    "Upper" orders entries by the flattened index ``(n, a)`` against ``(m, b)``, as the native
    kernels do: an entry with ``n < m``, or ``n = m`` and ``a < b``, is the one kept.
    """
    n = kernel.shape[0]
    idx = torch.arange(n, device=kernel.device)
    lower = idx[:, None] > idx[None, :]                        # (N, N)
    if mode == "full":
        k = kernel.shape[2]
        kidx = torch.arange(k, device=kernel.device)
        same = idx[:, None] == idx[None, :]
        lower = (lower[:, :, None, None]
                 | (same[:, :, None, None] & (kidx[:, None] > kidx[None, :])))
    else:
        lower = lower.reshape(lower.shape + (1,) * (kernel.dim() - 2))
    return torch.where(lower, transpose(kernel, mode), kernel)
