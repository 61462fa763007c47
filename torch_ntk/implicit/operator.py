"""NTKOperator: the empirical NTK of a batch with itself as a matrix-free linear operator.

``Θ v = J (Jᵀ v)``: one reverse pass per block of inputs accumulates ``u = Jᵀ v`` (a vector
in parameter space per column of v), then one forward-mode pass per block and column gives
``J u``. Time ``O(N·P)`` per column, memory the parameters times the columns plus one block's
activations; Θ (``N²`` entries) is never formed. The trace kernel ``Σ_a J_a J_aᵀ`` takes one
``u`` per output and column.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from torch_ntk.empirical import checks, state, verify
from torch_ntk.empirical.api import KernelPlan, empirical_ntk

_BLOCK_BYTES = 512 * 2 ** 20      # default budget for one block's saved activations
_VECTOR_BYTES = 1024 * 2 ** 20    # budget for the parameter-space vectors u held at once
_DIAGONAL_BLOCK = 64              # inputs per diagonal tile in ``diagonal()``


class NTKOperator:
    """Θ(x, x) as a linear operator: ``op @ v`` without forming the ``N × N`` kernel.

    Args:
        model (nn.Module): as for ``empirical_ntk``; every product leaves it as it was.
        x (Tensor[N, *in_shape], tuple or dict): inputs, as ``x1`` of ``empirical_ntk``.
        mode (str): ``"trace"``: Θ_tr (N, N), ``Σ_a Θ_aa``; ``"full"``: the (N·K, N·K) matrix
            with rows ordered ``n·K + a``.
        params, output: as for ``empirical_ntk``.
        batch_size (int, optional): inputs per forward/reverse pass; by default from the
            activation memory one sample's forward saves.

    Attributes:
        shape (tuple), dtype (torch.dtype), k (int: outputs per sample).
        matvecs (int): columns multiplied so far.

    Example:
        >>> op = torch_ntk.NTKOperator(model, x)                  # (N, N), trace mode
        >>> alpha, info = scipy.sparse.linalg.cg(op.to_scipy(), y)   # kernel regression
    """

    def __init__(self, model: nn.Module, x, *, mode: str = "trace", params=None, output=None,
                 batch_size: int | None = None) -> None:
        if mode not in ("trace", "full"):
            raise ValueError(f"NTKOperator: mode must be 'trace' or 'full', got {mode!r}.")
        # The probe checks of empirical_ntk (deterministic forward, samples independent), once.
        with KernelPlan(model, x, None, mode=mode, method="jacobian",
                        batch_size=batch_size or 1, params=params, output=output) as plan:
            self._user_model, self._model = plan.user_model, plan.model
            self._x, self._params = plan.x1, plan.params
            self.k, self.dtype, self.mode = plan.k, plan.dtype, mode
            n = plan.x1.shape[0]
            size = batch_size or _default_block(self._model, self._x)
        self.n = n
        self.shape = (n, n) if mode == "trace" else (n * self.k, n * self.k)
        self.device = self._x.device
        self._blocks = [slice(s, min(s + size, n)) for s in range(0, n, size)]
        self._checked: set[int] = set()
        self.matvecs = 0

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matmul(v)

    def matmul(self, v: Tensor) -> Tensor:
        """``Θ v`` for v of shape ``(rows,)`` or ``(rows, r)``, rows = ``shape[0]``; the
        model's dtype, on x's device."""
        if not isinstance(v, Tensor):
            raise TypeError(f"NTKOperator: v must be a Tensor, got {type(v).__name__}.")
        if v.dim() not in (1, 2) or v.shape[0] != self.shape[0]:
            raise ValueError(f"NTKOperator: v must have shape ({self.shape[0]},) or "
                             f"({self.shape[0]}, r), got {tuple(v.shape)}.")
        if not (v.is_floating_point() and torch.isfinite(v).all()):
            raise ValueError("NTKOperator: v must be a finite floating tensor.")
        vectors = v.detach().to(self.device, self.dtype).reshape(self.shape[0], -1)
        with state.fair_threads():
            held = state.ModelState(self._user_model)
            try:
                with state.no_autocast(), state.exact_matmul(), checks.checkpoint_errors():
                    result = self._product(vectors)
            finally:
                held.restore()
        self.matvecs += vectors.shape[1]
        return result.reshape(v.shape)

    def diagonal(self) -> Tensor:
        """The kernel's diagonal, Tensor[shape[0]]: ``Θ(x_n, x_n)`` (trace) or
        ``Θ(x_n, x_n)_aa`` at ``n·K + a`` (full), from ``empirical_ntk``'s diagonal tiles."""
        names = list(self._params)
        parts = []
        for start in range(0, self.n, _DIAGONAL_BLOCK):
            idx = slice(start, min(start + _DIAGONAL_BLOCK, self.n))
            tile = empirical_ntk(self._model, self._x[idx],
                                 mode="trace" if self.mode == "trace" else "diagonal",
                                 params=names)
            parts.append(torch.diagonal(tile, 0, 0, 1).movedim(-1, 0).reshape(-1))
        return torch.cat(parts)

    def features(self, dim: int, seed: int = 0) -> Tensor:
        """``ntk_features`` of the operator's inputs (over its parameters and output),
        Tensor[N, K, dim]: ``Θ ≈ Σ_d φ_d φ_dᵀ``, e.g. a preconditioner's low-rank part."""
        from torch_ntk.implicit.features import ntk_features
        return ntk_features(self._model, self._x, dim, seed=seed, params=list(self._params))

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out) for ``cg``,
        ``minres``, ``eigsh``, ``lobpcg`` and friends."""
        from scipy.sparse.linalg import LinearOperator

        def apply(v):
            out = self.matmul(torch.as_tensor(np.asarray(v, dtype=np.float64)))
            return out.detach().cpu().double().numpy()

        return LinearOperator(self.shape, matvec=apply, matmat=apply, rmatvec=apply,
                              rmatmat=apply, dtype=np.float64)

    # Internal

    def _product(self, v: Tensor) -> Tensor:
        """Θ v for v Tensor[rows, r]."""
        n, k, r = self.n, self.k, v.shape[1]
        per_vector = sum(p.numel() for p in self._params.values()) * self.dtype.itemsize
        group = max(1, _VECTOR_BYTES // max(1, per_vector))
        out = torch.zeros(n, k, r, dtype=self.dtype, device=self.device)
        # seeds: (output a or None for all, column c) -> the cotangent of the outputs
        if self.mode == "full":
            seeds = [(None, c) for c in range(r)]
            columns = v.reshape(n, k, r)
        else:
            seeds = [(a, c) for c in range(r) for a in range(k)]
            columns = v
        quadratic = torch.zeros(r, dtype=torch.float64, device=self.device)   # Σ ‖u‖²
        for start in range(0, len(seeds), group):
            part = seeds[start:start + group]
            u = self._reverse(columns, part)
            for name in u:
                quadratic.index_add_(0, torch.tensor([c for _, c in part], device=self.device),
                                     u[name].double().reshape(len(part), -1).pow(2).sum(1))
            self._forward(u, part, out)
        out = out.reshape(n * k, r) if self.mode == "full" else out.sum(1)
        self._check_adjoint(v, out, quadratic)
        return out

    def _cotangents(self, columns: Tensor, part: list, rows: slice) -> Tensor:
        """Tensor[len(part), m, K]: the cotangents of a block's outputs for each seed."""
        m = rows.stop - rows.start
        cot = torch.zeros(len(part), m, self.k, dtype=self.dtype, device=self.device)
        for i, (a, c) in enumerate(part):
            if a is None:
                cot[i] = columns[rows, :, c]
            else:
                cot[i, :, a] = columns[rows, c]
        return cot

    def _reverse(self, columns: Tensor, part: list) -> dict[str, Tensor]:
        """``u = Jᵀ v`` per seed: by parameter name, Tensor[len(part), *p.shape]."""
        names = list(self._params)
        tensors = [self._params[name] for name in names]
        u = {name: torch.zeros((len(part),) + p.shape, dtype=p.dtype, device=p.device)
             for name, p in zip(names, tensors)}
        for b, rows in enumerate(self._blocks):
            xb = self._x[rows]
            with torch.enable_grad():
                f = checks.check_output(self._model(xb), xb.shape[0], "x")
            self._check_block(b, xb, f)
            if not f.requires_grad:
                continue
            cot = self._cotangents(columns, part, rows)
            grads = _batched_grad(f, tensors, cot)
            for name, g in zip(names, grads):
                if g is not None:
                    u[name] += g
        return u

    def _forward(self, u: dict[str, Tensor], part: list, out: Tensor) -> None:
        """Adds ``J u`` per seed into out (Tensor[N, K, r]): all outputs of a full-mode seed,
        output a of a trace-mode seed (a, c)."""
        for rows in self._blocks:
            xb = self._x[rows]
            for i, (a, c) in enumerate(part):
                direction = {name: t[i] for name, t in u.items()}
                _, ju = verify._forward(self._model, self._params, xb, direction,
                                        want_jvp=True, reverse=False)
                if a is None:
                    out[rows, :, c] += ju
                else:
                    out[rows, a, c] += ju[:, a]

    def _check_block(self, b: int, xb: Tensor, f: Tensor) -> None:
        """On first use of a block: its outputs don't change when it is split and reordered
        (samples don't interact, so the batched J is the per-sample one)."""
        if b in self._checked:
            return
        split = verify.split_forward(self._model, self._params, xb, {}, want_jvp=False)
        scale = float(f.detach().abs().max()) + float(split.outputs.abs().max()) + 1e-30
        tol = checks.rounding_tolerance(self.dtype, f.shape[1])
        moved = (split.outputs - f.detach()).abs().amax(dim=1) > tol * scale
        if bool(moved.any()):
            sample = self._blocks[b].start + int(moved.nonzero()[0, 0])
            raise ValueError(
                f"NTKOperator: the model's output for sample {sample} changed when the samples "
                "beside it changed (its block was split in two and reordered), so the "
                "per-sample NTK is undefined: samples interact or the forward is random. Make "
                "the forward act on each sample independently.")
        self._checked.add(b)

    def _check_adjoint(self, v: Tensor, out: Tensor, quadratic: Tensor) -> None:
        """``vᵀ Θ v`` from the forward passes equals ``Σ ‖Jᵀ v‖²`` from the reverse ones."""
        vd, od = v.double(), out.double()
        forward = (vd * od).sum(0)
        scale = (vd.abs() * od.abs()).sum(0) + quadratic
        tol = verify.tolerance(self.dtype) * math.sqrt(max(1, v.shape[0]))
        bad = (forward - quadratic).abs() > tol * scale.clamp_min(torch.finfo(self.dtype).tiny)
        if bool(bad.any()):
            raise ValueError(
                "NTKOperator: the model's forward-mode derivative disagrees with its backward "
                "pass (vᵀ J Jᵀ v differs from ‖Jᵀ v‖²), e.g. a custom autograd.Function whose "
                "jvp and backward don't match. Fix the Function, or use empirical_ntk, which "
                "takes the backward's gradients.")


# Internal helpers

def _batched_grad(f: Tensor, tensors: list[Tensor], cot: Tensor) -> list:
    """``Σ_n cot[s, n] · ∂f_n/∂θ`` per seed s (Tensor[S, *θ.shape] or None per tensor)."""
    try:
        return list(torch.autograd.grad(f, tensors, cot, is_grads_batched=True,
                                        allow_unused=True, retain_graph=True))
    except RuntimeError as exc:   # a backward without a batching rule: one pass per seed
        if "use_reentrant" in str(exc):
            raise
    per_seed = [torch.autograd.grad(f, tensors, cot[s], retain_graph=True, allow_unused=True)
                for s in range(cot.shape[0])]
    return [None if g[0] is None else torch.stack(g) for g in zip(*per_seed)]


def _default_block(model: nn.Module, x: Tensor) -> int:
    """Inputs per block such that one block's saved activations fit ``_BLOCK_BYTES``: the
    bytes autograd saves per sample, from forwards on two probe sizes (the difference leaves
    out what every batch saves alike, such as weights)."""
    sizes = (1, 3) if x.shape[0] >= 3 else (1, x.shape[0])

    def saved_by(m: int) -> int:
        total = [0]

        def pack(t: Tensor):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x[:m])
        return total[0]

    small, large = (saved_by(m) for m in sizes)
    per_sample = (large - small) // (sizes[1] - sizes[0]) if sizes[1] > sizes[0] else large
    return int(max(1, min(x.shape[0], _BLOCK_BYTES // max(1, per_sample))))
