"""Cheap fingerprints of weights, inputs and options, equal on every rank that got the same.

A tensor's fingerprint hashes its shape, dtype, a strided sample of its elements (exact bytes)
and float64 sums of all elements and of their absolute values (rounded to 12 significant
digits, so that a different summation order on other hardware gives the same digest). Cost:
one pass over the data; nothing the size of the data is allocated at once.
"""
from __future__ import annotations

import hashlib
import json

import torch
from torch import Tensor, nn

_SAMPLES = 256
_CHUNK = 1 << 22


def tensor_digest(t: Tensor) -> str:
    """Hex digest of ``t`` (any shape, dtype and device)."""
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}".encode())
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n:
        idx = torch.linspace(0, n - 1, min(n, _SAMPLES), device=flat.device).long()
        sample = flat[idx].cpu()
        h.update(sample.contiguous().view(torch.uint8).numpy().tobytes())
        total = absolute = 0.0
        for start in range(0, n, _CHUNK):
            part = flat[start:start + _CHUNK].double()
            total += float(part.sum())
            absolute += float(part.abs().sum())
        h.update(f"{total:.11e}|{absolute:.11e}".encode())
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    """Digest of every parameter and buffer of ``model`` (names, requires_grad, values)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"p|{name}|{p.requires_grad}|{tensor_digest(p)}".encode())
    for name, b in model.named_buffers():
        h.update(f"b|{name}|{tensor_digest(b)}".encode())
    return h.hexdigest()


def inputs_digest(x) -> str:
    """Hex digest of an input: a tensor, or a tuple or dict of tensors and other values."""
    if isinstance(x, Tensor):
        return tensor_digest(x)
    items = sorted(x.items()) if isinstance(x, dict) else list(enumerate(x))
    h = hashlib.sha256(type(x).__name__.encode())
    for key, v in items:
        part = tensor_digest(v) if isinstance(v, Tensor) else repr(v)
        h.update(f"{key!r}={part};".encode())
    return h.hexdigest()


def options_digest(options: dict) -> str:
    """Digest of a JSON-able dict of options."""
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()


def to_tensor(digests: dict[str, str]) -> Tensor:
    """The digests in key order as a uint8 tensor of 32 bytes each."""
    raw = b"".join(bytes.fromhex(digests[k]) for k in sorted(digests))
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).clone()


def disagreements(digests: dict[str, str], gathered: list[Tensor]) -> dict[str, list[int]]:
    """For each key whose digest differs between ranks, the ranks that differ from rank 0.

    Args:
        digests: this rank's digests (for the keys).
        gathered: every rank's ``to_tensor(digests)``, in rank order.
    """
    keys = sorted(digests)
    rows = [bytes(g.cpu().tolist()) for g in gathered]
    out = {}
    for i, k in enumerate(keys):
        part = [r[32 * i:32 * (i + 1)] for r in rows]
        ranks = [r for r, p in enumerate(part) if p != part[0]]
        if ranks:
            out[k] = ranks
    return out
