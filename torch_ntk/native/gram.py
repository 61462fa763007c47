"""The hot loop of the structured method: a sum over layers of Hadamard products of Grams.

For layer factors ``h1[l] (N1, p_l)``, ``h2[l] (N2, p_l)``, ``d1[l] (N1, K, q_l)``,
``d2[l] (N2, K, q_l)`` and constants ``c[l]``::

    Θ[n, m, a, b] = Σ_l (h1[l][n] · h2[l][m] + c[l]) · (d1[l][n, a] · d2[l][m, b])

written as the full kernel ``(N1, N2, K, K)``, its trace over ``a = b`` ``(N1, N2)`` or its
diagonal ``(N1, N2, K)``. ``p_l`` may be 0 (a layer whose only parameters act through
``d``, with ``c[l] = 1``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from torch_ntk import _modes
from torch_ntk.native import route


def gram_sum(h1: Sequence[Tensor], h2: Sequence[Tensor], d1: Sequence[Tensor],
             d2: Sequence[Tensor], c: Sequence[float], *, mode: str, out: Tensor,
             symmetric: bool = False) -> Tensor:
    """Writes ``Σ_l (H1_l H2_lᵀ + c_l) ⊙ (D1_l D2_lᵀ)`` into ``out`` and returns it.

    Args:
        h1, h2 (list of Tensor[N1, p_l] / Tensor[N2, p_l]): input factors per layer.
        d1, d2 (list of Tensor[N1, K, q_l] / Tensor[N2, K, q_l]): output-gradient factors.
        c (list of float): per-layer constant added to the input Gram (1.0 for a bias).
        mode (str): ``"full"`` -> out Tensor[N1, N2, K, K], ``"trace"`` -> Tensor[N1, N2],
            ``"diagonal"`` -> Tensor[N1, N2, K].
        out (Tensor): written in place (may be a strided view of a larger tensor).
        symmetric (bool): the caller promises ``h2 is h1`` and ``d2 is d1``; only the
            upper triangle needs computing, the rest is mirrored.

    Which backend runs is decided by ``route.backend`` (its module doc gives the reasons).
    """
    chosen = route.backend(out)
    route.calls[chosen, out.device.type] += 1
    if chosen == "native":
        op = (torch.ops.torch_ntk.gram_sum_sym_out if symmetric
              else torch.ops.torch_ntk.gram_sum_out)
        if symmetric:
            op(list(h1), list(d1), [float(v) for v in c], mode, out)
        else:
            op(list(h1), list(h2), list(d1), list(d2), [float(v) for v in c], mode, out)
    else:
        _gram_sum_torch(h1, h2, d1, d2, c, mode=mode, out=out, symmetric=symmetric)
    return out


# Internal helpers

def _gram_sum_torch(h1: Sequence[Tensor], h2: Sequence[Tensor], d1: Sequence[Tensor],
                    d2: Sequence[Tensor], c: Sequence[float], *, mode: str,
                    out: Tensor, symmetric: bool = False) -> Tensor:
    """Pure-torch twin of the native op: one layer at a time through ATen matmuls.

    With ``symmetric`` the upper triangle is mirrored onto the lower one, as the native
    kernels do, so the result is exactly symmetric.
    """
    n1, n2 = out.shape[0], out.shape[1]
    acc = torch.zeros(out.shape, dtype=out.dtype, device=out.device)
    for h1_l, h2_l, d1_l, d2_l, c_l in zip(h1, h2, d1, d2, c):
        k = d1_l.shape[1]
        gh = h1_l @ h2_l.T + c_l if h1_l.shape[1] > 0 else None
        if mode == "trace":
            gd = d1_l.reshape(n1, -1) @ d2_l.reshape(n2, -1).T
        elif mode == "diagonal":
            gd = torch.bmm(d1_l.transpose(0, 1), d2_l.permute(1, 2, 0)).permute(1, 2, 0)
        else:
            gd = (d1_l.reshape(n1 * k, -1) @ d2_l.reshape(n2 * k, -1).T)
            gd = gd.reshape(n1, k, n2, k).permute(0, 2, 1, 3)
        if gh is None:
            acc.add_(gd, alpha=c_l)
        else:
            acc.add_(gh.reshape(gh.shape + (1,) * (gd.dim() - 2)) * gd)
    if symmetric:
        acc = _modes.mirror_upper(acc, mode)
    return out.copy_(acc)
