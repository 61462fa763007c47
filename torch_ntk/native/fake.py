"""Meta ("fake") kernels of the native ops: shapes and devices only, never data.

They let ``torch.compile`` and meta tensors trace ``gram_sum_out`` and ``pair_chain``; they word their errors like
``check_gram_inputs`` in csrc/gram_sum.h does for the real kernels.
"""
from __future__ import annotations

import torch

from torch_ntk import _modes
from torch_ntk.native import loader
from torch_ntk.native.pairs import STEP_INTS, STEP_SCALES

if loader._C is not None:
    @torch.library.register_fake("torch_ntk::gram_sum_out")
    def _gram_sum_out_fake(h1, h2, d1, d2, c, kind, out):
        _check_gram_shapes("gram_sum_out", h1, h2, d1, d2, c, kind, out)

    @torch.library.register_fake("torch_ntk::gram_sum_sym_out")
    def _gram_sum_sym_out_fake(h, d, c, kind, out):
        if out.dim() < 2 or out.shape[0] != out.shape[1]:
            raise ValueError("gram_sum_sym_out: out must be square in its first two dimensions "
                             f"(N, N, ...), got {tuple(out.shape)}.")
        _check_gram_shapes("gram_sum_sym_out", h, h, d, d, c, kind, out)


    @torch.library.register_fake("torch_ntk::pair_chain")
    def _pair_chain_fake(k, t, s1, s2, steps, scales, full, ntk):
        per = 2 if full else 1
        dims = (k.dim() - 2) // per
        if k.dim() <= 2 or (k.dim() - 2) % per or dims > 2:
            raise ValueError(f"pair_chain: k must be (B1, B2, *S{', *S' if full else ''}) with "
                             f"1 or 2 spatial axes, got {tuple(k.shape)}.")
        if t is not None and (t.shape != k.shape or t.dtype != k.dtype):
            raise ValueError(f"pair_chain: t must match k, got {tuple(t.shape)} {t.dtype} vs "
                             f"{tuple(k.shape)} {k.dtype}.")
        n = len(steps) // STEP_INTS
        if n < 1 or len(steps) != n * STEP_INTS or len(scales) != n * STEP_SCALES:
            raise ValueError(f"pair_chain: {STEP_INTS} ints and {STEP_SCALES} scales per step, "
                             f"got {len(steps)} and {len(scales)}.")
        ho, wo = steps[-2], steps[-1]
        spatial = (ho, wo) if dims == 2 else (wo,)
        shape = tuple(k.shape[:2]) + spatial * per
        return k.new_empty(shape), (k.new_empty(shape) if ntk else k.new_empty(0))


# Internal helpers

def _check_gram_shapes(op, h1, h2, d1, d2, c, mode, out) -> None:
    """Metadata-only twin of ``check_gram_inputs`` in csrc/gram_sum.h (never reads data)."""
    if mode not in _modes.MODES:
        raise ValueError(f"{op}: mode must be one of {_modes.MODES}, got {mode!r}.")
    if not len(h1) == len(h2) == len(d1) == len(d2) == len(c):
        raise ValueError(f"{op}: h1, h2, d1, d2 and c must have one entry per layer; got lengths "
                         f"{len(h1)}, {len(h2)}, {len(d1)}, {len(d2)} and {len(c)}.")
    dims = _modes.kernel_dims(mode)
    if out.dim() != dims:
        raise ValueError(f"{op}: out must have {dims} dimensions for mode {mode!r}, "
                         f"got {tuple(out.shape)}.")
    n1, n2 = out.shape[0], out.shape[1]
    k = out.shape[2] if mode != "trace" else (d1[0].shape[1] if len(d1) else 0)
    if mode == "full" and out.shape[3] != k:
        raise ValueError(f"{op}: out must be (N1, N2, K, K), got {tuple(out.shape)}.")
    for l, (a1, a2, b1, b2) in enumerate(zip(h1, h2, d1, d2)):
        for name, t, dim, rows in (("h1", a1, 2, n1), ("h2", a2, 2, n2), ("d1", b1, 3, n1),
                                   ("d2", b2, 3, n2)):
            if t.dim() != dim or t.shape[0] != rows:
                raise ValueError(f"{op}: {name}[{l}] must have {dim} dimensions and {rows} rows "
                                 f"to match out {tuple(out.shape)}, got {tuple(t.shape)}.")
            if t.device != out.device:
                raise ValueError(f"{op}: {name}[{l}] must be on {out.device} like out, "
                                 f"got {t.device}.")
        if a1.shape[1] != a2.shape[1] or b1.shape[1:] != b2.shape[1:] or b1.shape[1] != k:
            raise ValueError(f"{op}: layer {l} has mismatched widths: h1 {tuple(a1.shape)}, "
                             f"h2 {tuple(a2.shape)}, d1 {tuple(b1.shape)}, d2 {tuple(b2.shape)} "
                             f"(K = {k}).")
