"""The only door to the compiled core ``torch_ntk._C``; records why it is missing."""
from __future__ import annotations

import os

import torch

try:
    from torch_ntk import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
    LOAD_ERROR: str | None = None
except (ImportError, OSError) as exc:
    _C, LOAD_ERROR = None, f"{type(exc).__name__}: {exc}"

MODES = ("full", "trace", "diagonal")


def has_kernel(device_type: str) -> bool:
    """True when the native op is compiled for ``device_type`` and not disabled.

    ``TORCH_NTK_DISABLE_NATIVE=1`` turns the native path off at run time (pure torch is used).
    """
    if _C is None or os.environ.get("TORCH_NTK_DISABLE_NATIVE") == "1":
        return False
    return device_type == "cpu" or (device_type == "cuda" and cuda_version() > 0)


def cuda_version() -> int:
    """CUDA runtime version the kernels were built with (e.g. 13000); -1 without CUDA."""
    return -1 if _C is None else int(torch.ops.torch_ntk.cuda_version())


def cuda_arch() -> list[int]:
    """Compute capabilities compiled into the CUDA kernels (e.g. [80, 90])."""
    return [] if _C is None else [int(a) for a in torch.ops.torch_ntk.cuda_arch()]


if _C is not None:
    @torch.library.register_fake("torch_ntk::gram_sum_out")
    def _gram_sum_out_fake(h1, h2, d1, d2, c, kind, out):
        _check_gram_shapes("gram_sum_out", h1, h2, d1, d2, c, kind, out)

    @torch.library.register_fake("torch_ntk::gram_sum_sym_out")
    def _gram_sum_sym_out_fake(h, d, c, kind, out):
        if out.dim() < 2 or out.shape[0] != out.shape[1]:
            raise ValueError("gram_sum_sym_out: out must be square in its first two dimensions "
                             f"(N, N, ...), got {tuple(out.shape)}.")
        _check_gram_shapes("gram_sum_sym_out", h, h, d, d, c, kind, out)


# Internal helpers

def _check_gram_shapes(op, h1, h2, d1, d2, c, mode, out) -> None:
    """Metadata-only twin of ``check_gram_inputs`` in csrc/gram_sum.h (never reads data)."""
    if mode not in MODES:
        raise ValueError(f"{op}: mode must be one of {MODES}, got {mode!r}.")
    if not len(h1) == len(h2) == len(d1) == len(d2) == len(c):
        raise ValueError(f"{op}: h1, h2, d1, d2 and c must have one entry per layer; got lengths "
                         f"{len(h1)}, {len(h2)}, {len(d1)}, {len(d2)} and {len(c)}.")
    dims = {"full": 4, "trace": 2, "diagonal": 3}[mode]
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
