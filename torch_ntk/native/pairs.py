"""The native steps of the infinite-width engine: a convolution of a kernel over pairs of
positions, fused with the closed-form activation after it (``torch_ntk::conv_pairs``), and
average pooling of the full position-pair layout (``torch_ntk::pool_pairs``), csrc/conv_pairs.h.
The pure-torch rules in ``torch_ntk.infinite.rules`` are the reference."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from torch_ntk.native import route

ACTS = ("none", "identity", "relu", "leaky_relu", "erf")


def available(t: Tensor) -> bool:
    """Whether ``conv_pairs`` runs for tensors like ``t`` (compiled, on, float32/float64)."""
    return route.native_available(t.device.type) and t.dtype in (torch.float32, torch.float64)


def conv_pairs(k: Tensor, t: Optional[Tensor], s1: Optional[Tensor], s2: Optional[Tensor], *,
               kernel: Tuple[int, ...], stride: Tuple[int, ...], dilation: Tuple[int, ...],
               pad: Tuple[int, ...], out_size: Tuple[int, ...], full: bool, ntk: bool,
               w2: float, b2: float, act: str = "none", slope: float = 0.0
               ) -> Tuple[Tensor, Optional[Tensor]]:
    """One NTK convolution (then the activation ``act``) of a block's kernels.

    Args:
        k (Tensor[B1, B2, *S[, *S]]): the input NNGP over position pairs (``full``) or per
            position; t: the input NTK like k, or None for zero.
        s1 (Tensor[B1, *S_out]), s2 (Tensor[B2, *S_out]): each input's standard deviation of
            the convolution's output (None with ``act="none"``).
        kernel, stride, dilation, pad (before each axis), out_size: the convolution.
        w2, b2: ``w_std²``, ``b_std²``. ntk: compute the NTK.
    Returns:
        (K, Θ) of shape (B1, B2, *S_out[, *S_out]); Θ None without ``ntk``.
    """
    empty = k.new_empty(0)
    k_out, t_out = torch.ops.torch_ntk.conv_pairs(
        k, t, empty if s1 is None else s1, empty if s2 is None else s2, list(kernel),
        list(stride), list(dilation), list(pad), list(out_size), full, ntk, float(w2),
        float(b2), act, float(slope))
    return k_out, (t_out if ntk else None)


def pool_pairs(k: Tensor, t: Optional[Tensor], *, kernel: Tuple[int, ...],
               stride: Tuple[int, ...], out_size: Tuple[int, ...]
               ) -> Tuple[Tensor, Optional[Tensor]]:
    """Average pooling of a block's kernels over every pair of window offsets.

    Args:
        k (Tensor[B1, B2, *S, *S]): the NNGP over position pairs; t: the NTK like k, or None.
        kernel, stride, out_size: the pooling (no padding).
    Returns:
        (K, Θ) of shape (B1, B2, *S_out, *S_out); Θ None when t is None.
    """
    k_out, t_out = torch.ops.torch_ntk.pool_pairs(k, t, list(kernel), list(stride),
                                                  list(out_size))
    return k_out, (None if t is None else t_out)
