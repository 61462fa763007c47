"""empirical_ntk(): validate, choose a method, tile over batch_size, fill ``out``."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from torch_ntk import _checks
from torch_ntk._jacobian import JacobianNTK
from torch_ntk._structured import StructuredNTK, blocking_modules

_PROBE_ROWS = 5                  # probe batch size: reveals which layer axis is the batch axis
_FACTOR_BYTES = 512 * 2 ** 20    # default budget for the factors of one block of inputs
_TILE_BYTES = 512 * 2 ** 20      # default budget for one output tile
_CACHE_BYTES = 2 * 2 ** 30       # factors of x2 blocks kept for reuse across rows


def empirical_ntk(model: nn.Module, x1: Tensor, x2: Tensor | None = None, *,
                  mode: str = "full", method: str = "auto", batch_size: int | None = None,
                  out: Tensor | None = None) -> Tensor:
    """Empirical NTK Θ(x, x') = Σ_p ∂f(x)/∂θ_p · ∂f(x')/∂θ_p at the current parameters.

    The sum runs over every parameter with ``requires_grad=True``; outputs are flattened
    per sample, so a model mapping ``(N, ...)`` to ``(N, ...)`` has ``K = prod(out[1:])``.

    Args:
        model (nn.Module): samples in a batch must not interact (e.g. no BatchNorm in train
            mode). Its parameters, buffers, gradients and ``training`` flag are left as they were.
        x1 (Tensor[N1, *in_shape]): first batch, on the model's device.
        x2 (Tensor[N2, *in_shape], optional): second batch; ``None`` reuses x1 and computes
            only the tiles on or above the diagonal.
        mode (str): ``"full"`` -> Tensor[N1, N2, K, K] with ``k[n, m, a, b] = Θ(x1[n], x2[m])_ab``,
            ``"trace"`` -> Tensor[N1, N2] (``Σ_a Θ_aa``), ``"diagonal"`` -> Tensor[N1, N2, K].
        method (str): ``"structured"`` (layer-factorised Grams, never forms the Jacobian),
            ``"jacobian"`` (torch.func reference, any model) or ``"auto"`` (structured when the
            model has a Linear/Conv layer with trainable parameters, else jacobian).
        batch_size (int, optional): inputs of each side processed at once (memory tiling);
            chosen from the model's size when ``None``. The result doesn't depend on it.
        out (Tensor, optional): preallocated result of the shape above and the model's dtype,
            on any device (e.g. host memory while computing on a GPU); filled and returned.

    Returns:
        Tensor: shape as listed under ``mode``; the model's dtype, on x1's device (or ``out``).

    Raises:
        TypeError: ``model``, ``x1``, ``x2``, ``out`` or the model output of the wrong kind.
        ValueError: unknown ``mode``/``method``, mismatched shapes, dtypes or devices, no
            trainable parameters, samples that interact, non-finite outputs.

    Example:
        >>> torch_ntk.empirical_ntk(nn.Linear(3, 2), torch.randn(5, 3), mode="trace").shape
        torch.Size([5, 5])
    """
    _checks.check_options(mode, method, batch_size)
    params = _checks.check_model(model)
    _checks.check_inputs(x1, x2, next(iter(params.values())))
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        engine, k = _choose_engine(model, params, x1, method)
        n1, n2 = x1.shape[0], (x1 if x2 is None else x2).shape[0]
        shape = (n1, n2) + {"full": (k, k), "trace": (), "diagonal": (k,)}[mode]
        dtype = next(iter(params.values())).dtype
        _checks.check_out(out, shape, dtype)
        result = torch.empty(shape, dtype=dtype, device=x1.device) if out is None else out
        if batch_size is None:
            batch_size = _default_batch_size(engine, k, mode, dtype, max(n1, n2))
        _fill(engine, x1, x2, mode, batch_size, result)
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                if not torch.equal(buffer, saved):  # an untouched buffer keeps its version
                    buffer.copy_(saved)
    return result


# Internal helpers

def _choose_engine(model: nn.Module, params: dict[str, Tensor], x1: Tensor,
                   method: str) -> tuple[StructuredNTK | JacobianNTK, int]:
    """Picks the engine, runs the probe forward and checks samples don't interact.

    Returns:
        (engine, K): K the number of outputs per sample.
    """
    n1 = x1.shape[0]
    probe = x1[torch.arange(_PROBE_ROWS, device=x1.device) % n1]
    engine: StructuredNTK | JacobianNTK
    if method == "jacobian":
        engine = JacobianNTK(model, params)
        with torch.no_grad():
            f_probe = model(probe)
    else:
        engine = StructuredNTK(model, params)
        f_probe = engine.plan(probe)
        if engine.factorised and engine.verify(x1) > _verify_tolerance(x1, params):
            if method == "structured":
                raise ValueError(
                    "empirical_ntk: method='structured' does not reproduce the model's own "
                    "gradients: a parameter of a factorised layer ("
                    f"{', '.join(l.name for l in engine.layers)}) is also used outside that "
                    "layer's forward (e.g. passed to F.linear elsewhere). Use method='jacobian' "
                    "or 'auto'.")
            engine = JacobianNTK(model, params)
        elif not engine.factorised:
            if method == "structured":
                raise ValueError(
                    "empirical_ntk: method='structured' needs at least one nn.Linear, nn.Conv1d, "
                    "nn.Conv2d or torch_ntk.NTKLinear layer with trainable parameters applied "
                    "batch-first, but the trainable parameters live in "
                    f"{', '.join(blocking_modules(model))}. Use method='jacobian' or 'auto'.")
            engine = JacobianNTK(model, params)
    f_probe = _checks.check_output(f_probe, _PROBE_ROWS, "x1")
    with torch.no_grad():
        for row in range(min(n1, 2)):
            f_single = _checks.check_output(model(x1[row:row + 1]), 1, "x1")
            _checks.check_independent(f_probe, f_single, row)
    return engine, f_probe.shape[1]


def _verify_tolerance(x: Tensor, params: dict[str, Tensor]) -> float:
    """Relative error allowed between the structured and the autograd Θ_aa(x, x)."""
    dtype = next(iter(params.values())).dtype
    if dtype == torch.float64:
        return 1e-8
    return 2e-2 if x.is_cuda else 1e-3  # float32 on CUDA may run TF32 matmuls


def _default_batch_size(engine, k: int, mode: str, dtype: torch.dtype, n: int) -> int:
    """Largest block whose factors and output tile fit the default memory budgets."""
    per_pair = {"full": k * k, "trace": 1, "diagonal": k}[mode] * dtype.itemsize
    by_tile = int(math.sqrt(_TILE_BYTES / per_pair))
    by_factors = _FACTOR_BYTES // max(1, engine.bytes_per_sample(k))
    return max(1, min(n, by_tile, by_factors))


def _fill(engine, x1: Tensor, x2: Tensor | None, mode: str, batch_size: int,
          result: Tensor) -> None:
    """Computes the kernel tile by tile into ``result``; mirrors tiles when x2 is None."""
    symmetric = x2 is None
    rows = _blocks(x1.shape[0], batch_size)
    cols = rows if symmetric else _blocks(x2.shape[0], batch_size)
    cache = _FactorCache(engine, x1 if symmetric else x2, cols)
    direct = result.device == x1.device
    for i, r in enumerate(rows):
        f1 = cache.get(i) if symmetric else engine.factors(x1[r])
        for j, c in enumerate(cols):
            if symmetric and j < i:
                continue
            on_diagonal = symmetric and i == j
            f2 = f1 if on_diagonal else cache.get(j)
            target = result[r, c]
            tile = target if direct else torch.empty(target.shape, dtype=result.dtype,
                                                     device=x1.device)
            engine.contract(f1, f2, mode, tile, symmetric=on_diagonal)
            if not direct:
                target.copy_(tile)
            if symmetric and j > i:
                result[c, r].copy_(_transpose(tile, mode))
        if symmetric:
            cache.drop(i)


def _transpose(tile: Tensor, mode: str) -> Tensor:
    """Θ(x', x) from Θ(x, x'): swap the batch axes (and the output axes in full mode)."""
    return tile.permute(1, 0, 3, 2) if mode == "full" else tile.transpose(0, 1)


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


class _FactorCache:
    """Factors of column blocks, kept while they fit ``_CACHE_BYTES``, else recomputed."""

    def __init__(self, engine, x: Tensor, blocks: list[slice]) -> None:
        self.engine, self.x, self.blocks = engine, x, blocks
        self.kept: dict[int, object] = {}
        self.bytes = 0

    def get(self, j: int):
        if j in self.kept:
            return self.kept[j]
        factors = self.engine.factors(self.x[self.blocks[j]])
        size = _nbytes(factors)
        if self.bytes + size <= _CACHE_BYTES:
            self.kept[j] = factors
            self.bytes += size
        return factors

    def drop(self, j: int) -> None:
        if j in self.kept:
            self.bytes -= _nbytes(self.kept.pop(j))


def _nbytes(factors) -> int:
    if isinstance(factors, Tensor):
        return factors.numel() * factors.element_size()
    return sum(t.numel() * t.element_size() for t in (*factors.h, *factors.d))
