"""Count sketches of per-sample gradients, computed from the engines' factors.

Each parameter θ gets hash functions fixed by ``(seed, its name, dim)``: a matrix parameter
(two or more axes, read as ``θ.reshape(q, -1)``) one over its rows and one over its columns,
``bucket(i, j) = (r(i) + c(j)) mod dim`` with sign ``s_r(i) s_c(j)``; any other parameter one
over its entries. The feature of a gradient ``g`` is its count sketch, ``φ_k = Σ_{bucket(e)=k}
sign(e) g_e``: signs are independent with mean zero, so ``E[φ·φ'] = g·g'`` exactly, and
parameters with independent hashes add without bias, every one of them over all ``dim``
buckets.

The sketch is linear in ``g`` and the row/column hash makes the sketch of an outer product
``δ hᵀ`` the circular convolution of the sketches of δ and h (Pham and Pagh 2013), so a Gram
layer's share ``Σ_t δ_t h_tᵀ`` costs ``O(q + p + dim log dim)`` per position and output through
one FFT, and never forms the ``q × p`` gradient; per-sample gradient entries are scattered into
their buckets, and an Embedding's rows are a phase (the row hash) on the column sketch.
"""
from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor

from torch_ntk.empirical.factors import Factors

_SCATTER_ELEMENTS = 2 ** 24   # entries of a gradient entry signed and scattered at once


class Hashes:
    """The hash functions of every parameter, made on first use and kept.

    Args:
        shapes (dict): parameter name -> shape (the names fix the hashes, with ``seed``).
        dim (int): number of buckets.
        seed (int): the sketch's seed.
        device (torch.device): where the hashes live.
    """

    def __init__(self, shapes: dict[str, torch.Size], dim: int, seed: int,
                 device: torch.device) -> None:
        self.shapes, self.dim, self.seed, self.device = shapes, dim, seed, device
        self._made: dict[str, tuple[Tensor, ...]] = {}

    def of(self, name: str) -> tuple[Tensor, ...]:
        """``(rows, row_signs, cols, col_signs)`` of a matrix parameter (int64 buckets, signs
        ±1.0 in float64), ``(buckets, signs)`` of any other."""
        if name not in self._made:
            shape = self.shapes[name]
            sizes = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (math.prod(shape),)
            key = zlib.crc32(f"{self.seed}/{self.dim}/{name}".encode())
            gen = torch.Generator().manual_seed(key)
            made = []
            for size in sizes:
                buckets = torch.randint(self.dim, (size,), generator=gen)
                signs = torch.randint(2, (size,), generator=gen).double().mul_(2).sub_(1)
                made += [buckets.to(self.device), signs.to(self.device)]
            self._made[name] = tuple(made)
        return self._made[name]

    def flat(self, name: str, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """Buckets and signs of entries ``[start, stop)`` of the flattened parameter."""
        h = self.of(name)
        if len(h) == 2:
            return h[0][start:stop], h[1][start:stop]
        rows, row_signs, cols, col_signs = h
        e = torch.arange(start, stop, device=self.device)
        i, j = e // cols.shape[0], e % cols.shape[0]
        return (rows[i] + cols[j]) % self.dim, row_signs[i] * col_signs[j]


def sketch_factors(factors: Factors, hashes: Hashes, names: dict[str, str]) -> Tensor:
    """The count sketch of every sample's gradient of every output: Tensor[n, K, dim].

    Args:
        factors (Factors): an engine's factors of a block (every entry's ``params`` known).
        hashes (Hashes): the sketch.
        names (dict): engine parameter name -> the name ``hashes`` knows it by.
    """
    n, k = factors.outputs.shape
    dim = hashes.dim
    dtype = factors.outputs.dtype
    out = torch.zeros(n, k, dim, dtype=dtype, device=factors.outputs.device)
    spectrum = None   # Σ over Gram and token entries of the products of their sketches' FFTs

    def add_spectrum(s: Tensor) -> None:
        nonlocal spectrum
        spectrum = s if spectrum is None else spectrum + s

    for h, d, c, layout in _stacked(factors, dim):
        if layout is None:
            raise RuntimeError("ntk_features: a factor entry without its parameters' names.")
        if layout[0] == "grad":
            for name, start, stop in layout[1]:
                _scatter(out, d[..., start:stop], hashes, names[name])
            continue
        _, weight, bias, transposed = layout
        if weight is not None and h.shape[-1]:
            rows, row_signs, cols, col_signs = hashes.of(names[weight])
            if transposed:    # stored (p, q): its rows hash h, its columns d
                rows, row_signs, cols, col_signs = cols, col_signs, rows, row_signs
            if rows.shape[0] != d.shape[-1] or cols.shape[0] != h.shape[-1]:
                raise RuntimeError(f"ntk_features: the factors of {weight} don't match its shape.")
            a = torch.fft.rfft(_bucketed(d, rows, row_signs, dim), dim=-1)    # (n, T, K, F)
            b = torch.fft.rfft(_bucketed(h, cols, col_signs, dim), dim=-1)    # (n, T, F)
            add_spectrum(torch.einsum("ntkf,ntf->nkf", a, b))
        if bias is not None and c:
            buckets, signs = hashes.of(names[bias])
            out += math.sqrt(c) * _bucketed(d.sum(1), buckets, signs, dim)
    for tokens, d, name in zip(factors.tokens, factors.token_d, factors.token_params):
        if name is None:
            raise RuntimeError("ntk_features: a token entry without its table's name.")
        rows, row_signs, cols, col_signs = hashes.of(names[name])
        col_sketch = torch.fft.rfft(_bucketed(d, cols, col_signs, dim), dim=-1)  # (n,T,K,F)
        read = tokens >= 0
        safe = tokens.clamp_min(0)
        freq = torch.arange(dim // 2 + 1, device=d.device, dtype=torch.float64)
        angle = (-2 * math.pi / dim) * rows[safe].double()[..., None] * freq     # (n, T, F)
        phase = torch.polar((row_signs[safe] * read).unsqueeze(-1).expand_as(angle), angle)
        add_spectrum(torch.einsum("ntf,ntkf->nkf", phase.to(col_sketch.dtype), col_sketch))
    if spectrum is not None:
        out += torch.fft.irfft(spectrum, n=dim, dim=-1)
    return out


# Internal helpers

_STACKED_ELEMENTS = 2 ** 24   # entries of the positions of one layer sketched at once


def _stacked(factors: Factors, dim: int):
    """The entries as ``(h [n, T, p], d [n, T, K, q], c, layout)``: the positions of one
    layer (consecutive Gram entries of one group) stacked along T, in chunks whose sketches
    hold ``_STACKED_ELEMENTS`` entries at most."""
    entries = list(zip(factors.h, factors.d, factors.c, factors.group, factors.params))
    i = 0
    while i < len(entries):
        h, d, c, group, layout = entries[i]
        if layout is not None and layout[0] == "grad":
            yield h, d, c, layout
            i += 1
            continue
        j = i + 1
        per_chunk = max(1, _STACKED_ELEMENTS // max(1, d.shape[0] * d.shape[1] * dim))
        while (j < len(entries) and j - i < per_chunk and group >= 0
               and entries[j][3] == group):
            j += 1
        yield (torch.stack([e[0] for e in entries[i:j]], dim=1),
               torch.stack([e[1] for e in entries[i:j]], dim=1), c, layout)
        i = j


def _bucketed(x: Tensor, buckets: Tensor, signs: Tensor, dim: int) -> Tensor:
    """The count sketch of x over its last axis: Tensor[*x.shape[:-1], dim]."""
    out = x.new_zeros(*x.shape[:-1], dim)
    return out.index_add_(-1, buckets, x * signs.to(x.dtype))


def _scatter(out: Tensor, g: Tensor, hashes: Hashes, name: str) -> None:
    """Adds the sketch of gradient columns g (Tensor[n, K, P] of parameter ``name``)."""
    per_chunk = max(1, _SCATTER_ELEMENTS // max(1, g.shape[0] * g.shape[1]))
    for start in range(0, g.shape[2], per_chunk):
        stop = min(start + per_chunk, g.shape[2])
        buckets, signs = hashes.flat(name, start, stop)
        out.index_add_(2, buckets, g[..., start:stop] * signs.to(g.dtype))
