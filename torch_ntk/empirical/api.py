"""empirical_ntk(): validate, choose a method, tile over batch_size, fill ``out``."""
from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn

from torch_ntk import _modes
from torch_ntk.empirical import checks, inputs, state, verify
from torch_ntk.empirical.factors import Factors
from torch_ntk.empirical.jacobian import JacobianNTK, module_of
from torch_ntk.empirical.structured import StructureChanged, StructuredNTK, blocking_modules

_PROBE_SIZES = (5, 7, 11, 13, 17, 19, 23)  # probe batch sizes: a size no other axis has
_FACTOR_BYTES = 512 * 2 ** 20    # default budget for the factors of one block of inputs
_TILE_BYTES = 512 * 2 ** 20      # default budget for one output tile
_CACHE_BYTES = 2 * 2 ** 30       # factors of x2 blocks kept for reuse across rows
_CACHED_BLOCKS = 4               # ... or this many blocks when the caller sets batch_size
_WIDE_BLOCK = 128                # samples per block of wide factors, where memory allows
# The cost model of "auto", in one place: multiply-adds per pair of inputs. The Jacobian method
# contracts K² P; the structured one Σ_l cost_l (Gram layers p_l + K² q_l, per-sample layers
# K² P_l, position pairs T² (p_l + K² q_l)). Both spend about the same per input on forward and
# reverse passes, and the structured one has more fixed costs (hooks, one vjp per layer), so
# it is taken when its contraction is at most this share of the Jacobian's.
_STRUCTURED_SHARE = 0.5
_REPAIRS = 8     # failed checks a call may answer by isolating layers before it takes the Jacobian
# What each call chose and why, at INFO: logging.getLogger("torch_ntk").setLevel(logging.INFO)
_log = logging.getLogger("torch_ntk")
_REASONS = {"asked": "asked for", "cost": "the structured contraction would save too little",
            "no layer": "no layer whose calls keep the batch on one axis",
            "structure": "the layers' calls changed between blocks",
            "verify": "a block's check found the structured kernel wrong",
            "chosen": "its contraction is the cheaper",
            "forms": "its contraction saves little, but its convolutions' per-sample gradients "
                     "form faster"}


def empirical_ntk(model: nn.Module, x1, x2=None, *, mode: str = "full", method: str = "auto",
                  batch_size: int | None = None, out=None, output=None, params=None,
                  by_layer: bool = False):
    """Empirical NTK Θ(x, x') = Σ_p ∂f(x)/∂θ_p · ∂f(x')/∂θ_p at the current parameters.

    The sum runs over every parameter with ``requires_grad=True`` (or those ``params`` picks);
    outputs are flattened per sample, so a model mapping ``(N, ...)`` to ``(N, ...)`` has
    ``K = prod(out[1:])``.

    Args:
        model (nn.Module): samples in a batch must not interact (e.g. no BatchNorm in train
            mode). Its parameters, buffers, gradients and ``training`` flag are left as they were.
        x1 (Tensor[N1, *in_shape], tuple or dict): first batch, on the model's device; a tuple
            of tensors is passed as ``model(*x1)``, a dict as ``model(**x1)`` (every tensor in
            it batch-first with the same N1; other values passed as they are).
        x2 (like x1, optional): second batch; ``None`` reuses x1 and computes only the tiles on
            or above the diagonal.
        mode (str): ``"full"`` -> Tensor[N1, N2, K, K] with ``k[n, m, a, b] = Θ(x1[n], x2[m])_ab``,
            ``"trace"`` -> Tensor[N1, N2] (``Σ_a Θ_aa``), ``"diagonal"`` -> Tensor[N1, N2, K],
            ``"pntk"`` -> Tensor[N1, N2] (``(1/K) Σ_ab Θ_ab``, the pseudo-NTK: the NTK of
            ``Σ_a f_a / sqrt(K)``, at the cost of one output).
        method (str): ``"structured"`` (layer-factorised Grams, never forms the Jacobian),
            ``"jacobian"`` (torch.func reference, any model) or ``"auto"`` (structured when the
            model has a Linear/Conv layer with trainable parameters, else jacobian).
        batch_size (int, optional): inputs of each side processed at once (memory tiling);
            chosen from the model's size when ``None``. The result doesn't depend on it.
        out (Tensor, optional): preallocated result of the shape above and the model's dtype,
            on any device (e.g. host memory while computing on a GPU); filled and returned
            (with ``by_layer``, a dict of such tensors by module name, or None).
        output (callable, optional): applied to what the model returns, gives the (N, ...)
            tensor whose kernel is taken, e.g. ``lambda o: o.logits[:, -1]``. Without it the
            model returns a tensor, or a tuple/dict whose tensors (all batch-first) are taken,
            flattened per sample and concatenated.
        params (optional): the parameters the kernel sums over: ``None`` (every one with
            ``requires_grad``), an iterable of names (as in ``named_parameters()``) or a
            callable ``(name, param) -> bool``, e.g. LoRA adapters or the head only. The
            others are constants; no ``requires_grad`` flag is changed.
        by_layer (bool): return ``{module name: kernel over that module's own parameters}``
            (names as in ``named_modules()``, ``""`` for the root's own), which sum to the
            kernel; each block's factors are computed once and contracted per module.

    Returns:
        Tensor: shape as listed under ``mode``; the model's dtype, on x1's device (or ``out``).
        A dict of them with ``by_layer``.

    Raises:
        TypeError: ``model``, ``x1``, ``x2``, ``out`` or the model output of the wrong kind.
        ValueError: unknown ``mode``/``method``, mismatched shapes, dtypes or devices, no
            trainable parameters, samples that interact, non-finite outputs.

    Example:
        >>> torch_ntk.empirical_ntk(nn.Linear(3, 2), torch.randn(5, 3), mode="trace").shape
        torch.Size([5, 5])
    """
    if by_layer:
        return _by_layer(model, x1, x2, mode=mode, method=method, batch_size=batch_size,
                         out=out, output=output, params=params)
    with KernelPlan(model, x1, x2, mode=mode, method=method, batch_size=batch_size,
                    params=params, output=output) as plan:
        x1, x2, mode = plan.x1, plan.x2, plan.mode
        checks.check_out(out, plan.shape, plan.dtype, inputs=(x1, x2), model=plan.model)
        result = torch.empty(plan.shape, dtype=plan.dtype, device=x1.device) if out is None else out
        direct = result.device == x1.device
        for i, j in plan.tiles():
            target = result[plan.rows[i], plan.cols[j]]
            tile = plan.compute_tile(i, j, target if direct else None)
            if not direct:
                target.copy_(tile)
            if plan.symmetric and j > i:
                result[plan.cols[j], plan.rows[i]].copy_(_modes.transpose(tile, mode))
            plan.release(i, j)
        if out is not None:
            torch.autograd.graph.increment_version(out)  # written in place, like torch's out=
    return result


def _by_layer(model: nn.Module, x1, x2, *, out, params, mode: str, method: str,
              batch_size: int | None, output) -> dict:
    """``{module name: kernel over the module's own selected parameters}`` in one pass: each
    block's factors are computed once and contracted module by module (a parameter
    registered in several modules, tied weights, counts once, with the first of them in
    ``named_modules()`` order). Engines whose entries mix modules (a catch-all layer that also
    accounts for a child's parameters) take one call per module instead."""
    with KernelPlan(model, x1, x2, mode=mode, method=method, batch_size=batch_size,
                    params=params, output=output) as plan:
        groups, names = plan.module_groups()
        if out is not None and (not isinstance(out, dict) or set(out) - set(names.values())):
            raise ValueError(f"empirical_ntk: with by_layer=True, out must be a dict of tensors "
                             f"keyed by module name (any of {sorted(names.values())}), or None.")
        outs = out or {}
        for g in groups:
            if names[g] in outs:
                checks.check_out(outs[names[g]], plan.shape, plan.dtype,
                                 inputs=(plan.x1, plan.x2), model=plan.model)
        results = {g: outs.get(names[g]) if names[g] in outs else
                   torch.empty(plan.shape, dtype=plan.dtype, device=plan.x1.device)
                   for g in groups}
        for i, j in plan.tiles():
            if None in plan.tile_owners(i, j):
                break
            for g in groups:
                target = results[g][plan.rows[i], plan.cols[j]]
                direct = target.device == plan.x1.device
                tile = plan.compute_tile(i, j, target if direct else None, owner=g)
                if not direct:
                    target.copy_(tile)
                if plan.symmetric and j > i:
                    results[g][plan.cols[j], plan.rows[i]].copy_(_modes.transpose(tile, plan.mode))
            plan.release(i, j)
        else:
            for t in outs.values():
                torch.autograd.graph.increment_version(t)
            return {names[g]: results[g] for g in groups}
    return _by_layer_calls(model, x1, x2, out=out, params=params, mode=mode, method=method,
                           batch_size=batch_size, output=output)


def _by_layer_calls(model: nn.Module, x1, x2, *, out, params, **options) -> dict:
    """``by_layer`` as one ``empirical_ntk`` call per module."""
    model = _original_module(model)
    chosen = {id(p) for p in checks.check_model(model, params).values()}
    groups: dict[str, list[str]] = {}
    taken: set[int] = set()
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in chosen and id(p) not in taken:
                taken.add(id(p))
                groups.setdefault(name, []).append(f"{name}.{pname}" if name else pname)
    outs = out or {}
    return {name: empirical_ntk(model, x1, x2, params=names, out=outs.get(name), **options)
            for name, names in groups.items()}


class KernelPlan:
    """A checked kernel computation split into tiles: what ``empirical_ntk`` and
    ``torch_ntk.distributed`` share.

    Entering the context validates the arguments, takes the model's lock, picks the engine
    (probe forward and assumption checks) and the tile grid; leaving it restores the model's
    state (buffers, registered tensors, ``training``) and releases the lock.

    Attributes:
        shape (tuple): the kernel's shape for ``mode``; ``dtype`` the model's dtype.
        rows, cols (list of slice): blocks of x1 and x2 (``cols is rows`` when x2 is None).
        symmetric (bool): x2 is None; only tiles with ``j >= i`` are computed.
        engine: the structured or jacobian engine chosen (``engine.name``).
    """

    def __init__(self, model: nn.Module, x1, x2=None, *, mode: str = "full",
                 method: str = "auto", batch_size: int | None = None, params=None,
                 output=None, sketch: bool = False) -> None:
        batch_size = checks.check_options(mode, method, batch_size)
        # Factors to be sketched, never contracted (ntk_features): by position where a layer
        # has them, and the structured engine wherever it applies (the cost model weighs
        # contractions).
        self.sketch = sketch
        model = _original_module(model)
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"empirical_ntk: model must be a torch.nn.Module, got {type(model).__name__}.")
        checks.check_materialised(model)
        self.user_model = self.model = model
        self.x1, self.x2 = x1, x2
        self.pseudo = mode == "pntk"     # the trace of the one output Σ_a f_a / sqrt(K)
        self.mode = "trace" if self.pseudo else mode
        self.method, self.batch_size = method, batch_size
        self.select, self.output = params, output
        self.symmetric = x2 is None
        self._state: state.ModelState | None = None

    def __enter__(self) -> "KernelPlan":
        self._threads = state.fair_threads()
        self._threads.__enter__()
        try:
            self._state = state.ModelState(self.model)
        except BaseException:
            self._threads.__exit__(None, None, None)
            raise
        try:
            # Under the model's lock: another call may have parameters swapped out right now.
            self.params = checks.check_model(self.model, self.select)
            if inputs.needed(self.x1, self.output, self.pseudo):
                self.model, self.x1, self.x2 = inputs.adapt(
                    self.user_model, self.x1, self.x2, self.output, self.pseudo,
                    next(iter(self.params.values())))
                self.params = {inputs.PREFIX + n: p for n, p in self.params.items()}
            checks.check_inputs(self.x1, self.x2, next(iter(self.params.values())))
            with state.no_autocast(), checks.checkpoint_errors():
                self.engine, self.k, self.computing = _choose_engine(
                    self.model, self.params, self.x1, self.x2, self.method,
                    by_cost=not self.sketch)
            x2 = self.x1 if self.x2 is None else self.x2
            n1, n2 = self.x1.shape[0], x2.shape[0]
            self.shape = _modes.kernel_shape(n1, n2, self.k, self.mode)
            self.dtype = next(iter(self.params.values())).dtype
            size = self.batch_size or _default_batch_size(self.engine, self.k, self.mode,
                                                          self.dtype, max(n1, n2),
                                                          self.sketch, self.x1.device)
            self.rows = _blocks(n1, size)
            self.cols = self.rows if self.symmetric else _blocks(n2, size)
            self._budget = _cache_budget(self.engine, self.k, n2, size, self.batch_size,
                                         self.x1.device)
            self.direction = verify.direction(self.model, self.params)
            _log_choice(self, "")
            self._generation = 0   # bumped when a failed check changes the engine
            self._checked: set[tuple[str, int]] = set()   # blocks (side, start) checked
            self._repairs = 0
            self._x2 = x2
            self._cache = _FactorCache(self._checked_factors, x2, self.cols, self._budget,
                                       "x1" if self.symmetric else "x2")
            self._row: tuple = (None, None, None)
        except BaseException:
            self._state.restore()
            self._threads.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._state.restore()
        finally:
            self._threads.__exit__(None, None, None)
        self._cache = None   # it holds a bound method of the plan: no cycle keeps the model alive

    def tiles(self) -> list[tuple[int, int]]:
        """Tile indices ``(i, j)`` in computing order (``j >= i`` only when symmetric)."""
        return [(i, j) for i in range(len(self.rows)) for j in range(len(self.cols))
                if not (self.symmetric and j < i)]

    def compute_tile(self, i: int, j: int, out: Tensor | None = None,
                     owner: str | None = None) -> Tensor:
        """Θ(x1[rows[i]], x2[cols[j]]) in ``mode``, written into ``out`` when given; over the
        parameters of the module ``owner`` only when given (see ``tile_owners``).

        Both blocks' factors have passed ``verify.check``; a non-finite tile (factors whose
        products overflow the dtype) is recomputed from the factors in float64.
        """
        f1, f2 = self._tile_factors(i, j)
        if owner is not None:
            f1, f2 = f1.of(owner), (None if f2 is f1 else f2.of(owner))
            f2 = f1 if f2 is None else f2
        shape = _modes.kernel_shape(self.rows[i].stop - self.rows[i].start,
                                    self.cols[j].stop - self.cols[j].start, self.k, self.mode)
        if out is None:
            out = torch.empty(shape, dtype=self.dtype, device=self.x1.device)
        symmetric = self.symmetric and i == j
        self.engine.contract(f1, f2, self.mode, out, symmetric=symmetric)
        if not _all_finite(out):
            w1 = _widened(f1)
            w2 = w1 if f2 is f1 else _widened(f2)
            wide = torch.empty(shape, dtype=torch.float64, device=out.device)
            self.engine.contract(w1, w2, self.mode, wide, symmetric=symmetric)
            checks.check_kernel_fits(wide, self.dtype, self.rows[i].start, self.cols[j].start)
            out.copy_(wide)
        return out

    def block_factors(self, i: int) -> Factors:
        """The factors of x1's block ``rows[i]``, checked as for a tile (not kept)."""
        return self._checked_factors(self.x1[self.rows[i]], self.rows[i].start, "x1")

    def user_names(self) -> dict[str, str]:
        """``params``' names -> the names in the caller's model (``named_parameters()``)."""
        wrapped = self.model is not self.user_model
        return {n: n[len(inputs.PREFIX):] if wrapped else n for n in self.params}

    def module_groups(self) -> tuple[list[str], dict[str, str]]:
        """The modules owning ``params`` (in ``named_modules()`` order, names in the engines'
        model) and their names in the caller's model: ``by_layer``'s keys."""
        order = {name: i for i, (name, _) in enumerate(self.model.named_modules())}
        groups = sorted({module_of(n) for n in self.params}, key=lambda n: order.get(n, 0))
        wrapped = self.model is not self.user_model
        return groups, {g: inputs.user_name(g) if wrapped else g for g in groups}

    def owners_known(self) -> bool:
        """Every factor entry will name the module it accounts for (else ``by_layer`` takes
        one call per module): no factorised layer holds parameters of several modules."""
        engine = self.engine
        return not isinstance(engine, StructuredNTK) or all(
            engine._owner(layer) is not None for layer in engine.layers)

    def tile_owners(self, i: int, j: int) -> set:
        """The modules the factors of tile ``(i, j)`` account for, by name in ``model``; None
        among them when some entry mixes the parameters of several."""
        f1, f2 = self._tile_factors(i, j)
        return f1.owners() | f2.owners()

    def _tile_factors(self, i: int, j: int):
        while True:  # a failed check on the second block may change the engine
            generation = self._generation
            f1 = self._cache.get(i) if self.symmetric else self._row_factors(i)
            f2 = f1 if self.symmetric and i == j else self._cache.get(j)
            if generation == self._generation:
                return f1, f2

    def release(self, i: int, j: int) -> None:
        """Tells the plan tile ``(i, j)`` is done, so factors no longer needed can go."""
        if self.symmetric and j == len(self.cols) - 1:
            self._cache.drop(i)

    def _row_factors(self, i: int):
        if self._row[0] != i or self._row[2] != self._generation:
            factors = self._checked_factors(self.x1[self.rows[i]], self.rows[i].start, "x1")
            self._row = (i, factors, self._generation)
        return self._row[1]

    def _checked_factors(self, x: Tensor, start: int, side: str):
        """The engine's factors of the block x (Tensor[n, *in_shape]; its first sample is
        sample ``start`` of ``side``), once ``verify.check`` has passed on them (once per
        block and engine: factors recomputed because the cache dropped them are not checked
        again).

        A failed check ends in a ValueError (samples that interact; a layer of
        ``method="structured"`` whose share is wrong; a Jacobian that differs from the real
        model's) or, for ``auto`` and the Jacobian path, in a corrected engine: the layers found
        wrong go to the Jacobian (``isolate``), or the Jacobian is taken from plain autograd on
        the real model instead of torch.func. Factors computed before the change are dropped.
        """
        if (side, start) in self._checked:  # recomputed for a tile: checked already
            with state.no_autocast(), checks.checkpoint_errors():
                return self._engine_factors(x)
        while True:
            with state.no_autocast(), state.exact_matmul(), checks.checkpoint_errors():
                try:
                    factors = self._engine_factors(x, self.direction)
                except StructureChanged:
                    if self.method != "auto":
                        raise
                    self.engine = _fallback(self.model, self.params, "structure")
                    self._changed()
                    continue
                verdict = verify.check(self.engine, x, self.direction, factors,
                                       self.computing)
                if verdict.ok or self._repair(x, verdict, start, side):
                    self._checked.add((side, start))
                    return verdict.factors

    def _engine_factors(self, x: Tensor, r=None) -> Factors:
        if self.sketch and isinstance(self.engine, StructuredNTK):
            return self.engine.factors(x, r, positions=True)
        return self.engine.factors(x, r)

    def _repair(self, x: Tensor, verdict, start: int, side: str) -> bool:
        """Acts on a failed check; True: the factors stand as computed (see above)."""
        where = f"sample {start + verdict.sample} of {side}"
        if verdict.kind == "interact":
            raise ValueError(
                f"empirical_ntk: the model's output for {where} changed when the samples beside "
                "it changed (its batch was reordered, or split in two), so the per-sample NTK "
                "is undefined: samples interact (e.g. batch statistics, attention across the "
                "batch, a term that mixes a rare sample into the others) or the forward is "
                "random. Make the forward act on each sample independently.")
        engine, self._repairs = self.engine, self._repairs + 1
        if isinstance(engine, JacobianNTK):
            if engine.jacobian.vmap is not False:    # torch.func misses uses outside the
                engine.jacobian.use_autograd()       # registered attributes: plain autograd
                self._changed()
                return False
            if verdict.kind == "unverifiable":
                return True  # plain autograd on the real model, samples checked independent
            again = verify.check(engine, x, self.direction, verdict.factors, self.computing,
                                 reverse=True)
            if again.ok:  # forward mode disagrees with the backward (a Function's wrong jvp):
                return True  # the NTK is reverse mode's, which the Jacobian agrees with
            raise ValueError(
                f"empirical_ntk: the model's per-sample gradients on {where} differ from the "
                "derivative of its backward pass over the batch along a random direction "
                f"(relative error {again.error:.2e}): its gradients depend on the batch (e.g. "
                "samples mixed only in the backward, or a gradient scaled by batch counts), so "
                "no per-sample NTK can be taken exactly.")
        sample = x[verdict.sample:verdict.sample + 1]
        if verdict.kind == "mismatch" and self._repairs <= _REPAIRS:
            dropped = engine.isolate(sample, self.direction, dtype=self.computing, block=x)
        else:
            dropped = None
        if self.method == "structured":
            culprits = ", ".join(dropped) if dropped else ", ".join(l.name for l in engine.layers)
            if verdict.kind == "unverifiable":
                raise ValueError(
                    "empirical_ntk: method='structured' can't check its factors on this model: "
                    "neither forward-mode autograd nor double backward runs through it (e.g. a "
                    "custom autograd.Function without jvp). Use method='auto' or 'jacobian'.")
            raise ValueError(
                f"empirical_ntk: method='structured' does not reproduce the model's own "
                f"gradients on {where}: a parameter of layer(s) {culprits} also acts outside "
                "that layer's call there (e.g. passed to F.linear elsewhere or only for some "
                "samples, read by a forward hook, or reused when a feature is rare). Use "
                "method='jacobian' or 'auto'.")
        if dropped is None or not engine.factorised or _too_costly(engine, self.params, self.k):
            fallback = _fallback(self.model, self.params, "verify")
            if verdict.kind == "unverifiable":
                fallback.jacobian.use_autograd()
            self.engine = fallback
        self._changed()
        return False

    def _changed(self) -> None:
        """The engine changed: factors already computed are of the old one."""
        _log_choice(self, "now ")
        self._generation += 1
        self._checked.clear()
        self._row = (None, None, None)
        self._cache = _FactorCache(self._checked_factors, self._x2, self.cols, self._budget,
                                   "x1" if self.symmetric else "x2")


# Internal helpers

def _log_choice(plan: "KernelPlan", when: str) -> None:
    if not _log.isEnabledFor(logging.INFO):
        return
    engine = plan.engine
    reason = getattr(engine, "reason", None) or ("asked" if plan.method != "auto" else "chosen")
    extra = f"; {len(engine.layers)} layers factorised" if engine.name == "structured" else ""
    _log.info("empirical_ntk: %smethod %r (%s%s): K=%d outputs, %d parameters, blocks of %d",
              when, engine.name, _REASONS.get(reason, reason), extra, plan.k,
              sum(p.numel() for p in plan.params.values()),
              plan.rows[0].stop - plan.rows[0].start)


def _choose_engine(model: nn.Module, params: dict[str, Tensor], x1: Tensor,
                   x2: Tensor | None, method: str, by_cost: bool = True
                   ) -> tuple[StructuredNTK | JacobianNTK, int]:
    """Picks the engine after checking, on a probe batch, what the methods rest on.

    The probe holds distinct samples of x1 and x2 (a perturbed copy when there is only one):

    - each sample's output is the same in every row of the probe that holds it and in a
      batch of the distinct samples alone, in reversed order (samples don't interact, the
      forward is not random): otherwise a ValueError, whatever the method, that names a
      random forward when a second forward of the probe disagrees with the first;
    - structured: each layer's calls keep every sample on its own batch row (a layer that
      doesn't is handed to the Jacobian path under "auto", named in a ValueError under
      "structured"), and the factorised kernel equals autograd's on pairs of distinct samples
      (else "auto" hands the layers found wrong by bisection to the Jacobian path, or takes
      the Jacobian method).

    Returns:
        (engine, K, computing dtype): K the number of outputs per sample; the least precise
        floating dtype the model computes in (``verify.computing_dtype``).
    """
    scripted = [name or "<root>" for name, m in model.named_modules()
                if isinstance(m, torch.jit.ScriptModule)]
    if scripted:  # no hooks and no torch.func parameter swaps: plain autograd on the model
        if method == "structured":
            raise ValueError(
                f"empirical_ntk: method='structured' can't record the calls of TorchScript "
                f"module(s) {', '.join(scripted)} (they take no hooks). Use method='auto' or "
                "'jacobian', or pass the module before torch.jit.script.")
        method = "jacobian"
    samples = _distinct_samples(x1, x2)
    with state.exact_matmul():
        for size in _PROBE_SIZES:
            if size in x1.shape[1:]:
                continue
            probe = samples[torch.arange(size, device=x1.device) % samples.shape[0]]
            engine: StructuredNTK | JacobianNTK
            with checks.input_dtype_errors(x1, params), checks.checkpoint_without_gradients():
                if method == "jacobian":
                    engine = JacobianNTK(model, params)
                    if scripted:
                        engine.jacobian.use_autograd()
                    with torch.enable_grad():  # every forward of a call runs in grad mode
                        f_probe, computing, produced = verify.computing_dtype(
                            lambda: _detached(model(probe)), torch.float64)
                    break
                engine = StructuredNTK(model, params)
                f_probe, computing, produced = verify.computing_dtype(
                    lambda: engine.plan(probe), torch.float64)
            if not engine.ambiguous:
                break
        f_probe = checks.check_output(f_probe, probe.shape[0], "x1")
        computing = verify.least_precise(computing, f_probe.dtype)
        activations = produced // probe.shape[0]
        if by_cost and method == "auto" and engine.factorised and _too_costly(
                engine, params, f_probe.shape[1]):
            if _forms_cheaper(engine, params, f_probe.shape[1]):
                engine.reason = "forms"
            else:
                engine, method = _fallback(model, params, "cost"), "jacobian"
        moved: set[str] = set()
        m = samples.shape[0]

        def blame_randomness() -> None:
            """A failed check on the probe: a random forward, when a second one disagrees."""
            with checks.checkpoint_without_gradients():
                again = _detached(model(probe))
            checks.check_deterministic(f_probe, checks.check_output(again, size, "x1"),
                                       computing)

        with torch.enable_grad():
            try:
                for row in range(size - m):   # rows j and j + m hold the same sample
                    checks.check_independent(f_probe, f_probe[row + m:row + m + 1], row,
                                             computing)
                # the distinct samples again, as a batch of another size and order
                rows = torch.arange(m - 1, -1, -1, device=probe.device)
                if method == "jacobian":
                    f_rows = _detached(model(probe[rows]))
                else:
                    bad, f_rows = engine.check_rows(probe, rows)
                    moved.update(bad)
                f_rows = checks.check_output(f_rows, m, "x1")
                for i, row in enumerate(rows.tolist()):
                    checks.check_independent(f_probe, f_rows[i:i + 1], row, computing)
            except ValueError:
                blame_randomness()
                raise
        if method == "jacobian":
            engine.activations = activations
            return engine, f_probe.shape[1], computing
        moved = sorted(moved)
        if moved and method == "structured":
            raise ValueError(
                f"empirical_ntk: method='structured' can't use layer(s) {', '.join(moved)}: "
                "their inputs or outputs don't keep each sample on its own batch row (e.g. the "
                "model reorders, sorts or folds the batch around them). Use method='auto', "
                "which computes their share with the Jacobian, or method='jacobian'.")
        engine.drop(set(moved))
        k = f_probe.shape[1]
        if not engine.factorised:
            if method == "structured":
                raise ValueError(
                    "empirical_ntk: method='structured' found no layer whose calls keep the "
                    "batch on one axis; the trainable parameters live in "
                    f"{', '.join(blocking_modules(model))}. Use method='jacobian' or 'auto'.")
            engine = _fallback(model, params, "no layer")
    engine.activations = activations
    return engine, k, computing


def _detached(f):
    """A forward's output without its graph (other kinds pass to ``check_output``)."""
    return f.detach() if isinstance(f, Tensor) else f


def _too_costly(engine: StructuredNTK, params: dict[str, Tensor], k: int) -> bool:
    """The cost model: the structured contraction saves too little over the Jacobian's."""
    return engine.pair_cost(k) >= _STRUCTURED_SHARE * k * k * sum(
        p.numel() for p in params.values())


def _forms_cheaper(engine: StructuredNTK, params: dict[str, Tensor], k: int) -> bool:
    """The structured engine is the faster one although its contraction saves little: every
    parameter is a layer's, no layer needs a per-module vjp (the catch-all rule), most of
    them sit in convolutions, and its contraction costs no more than the Jacobian's.

    The Jacobian method forms per-sample gradients inside ``vmap``, where a convolution's
    weight gradient becomes a batched backward convolution per sample and output; the
    structured engine takes δ from one batched reverse pass and the gradients from GEMMs over
    the patches. Measured on ReLU CNNs of 64–256 channels whose 8×8 maps leave most layers
    per-sample (1.3–1.8× faster); a linear layer's gradient is a GEMM either way, so
    transformers stay with the cost rule above.
    """
    if engine.foreign or any(layer.rule.name == "local" for layer in engine.layers):
        return False
    total = sum(p.numel() for p in params.values())
    conv = sum(p.numel() for layer in engine.layers if layer.rule.name == "conv"
               for p in layer.params.values())
    return 2 * conv >= total and engine.pair_cost(k) <= k * k * total


def _fallback(model: nn.Module, params: dict[str, Tensor], reason: str) -> JacobianNTK:
    """The Jacobian engine, remembering why ``auto`` took it (tests and benchmarks read it):
    "no layer", "cost" (the structured contraction would save little) or "verify"."""
    engine = JacobianNTK(model, params)
    engine.reason = reason
    return engine


def _original_module(model: nn.Module) -> nn.Module:
    """The module a ``torch.compile``d model wraps (its parameters are the same objects)."""
    original = getattr(model, "_orig_mod", None)
    return original if isinstance(original, nn.Module) else model


def _distinct_samples(x1: Tensor, x2: Tensor | None) -> Tensor:
    """Up to 3 samples from x1 and x2 (first, last, middle), with two distinct at least.

    When every candidate is the same, the last becomes a perturbed copy (noise for floating
    inputs, the entries rolled along the last axis for integer ones, or moved by one towards 0
    when that changes nothing: a constant row), so that samples that interact can't hide behind
    identical rows.
    """
    picks = [x1[:1], x1[-1:]] + ([] if x2 is None else [x2[:1], x2[-1:]]) + [
        x1[x1.shape[0] // 2:x1.shape[0] // 2 + 1]]
    distinct: list[Tensor] = []
    for p in picks:
        if len(distinct) < 3 and not any(torch.equal(p, q) for q in distinct):
            distinct.append(p)
    if len(distinct) == 1:
        x = distinct[0]
        if x.is_floating_point():
            gen = torch.Generator(device=x.device).manual_seed(0)
            noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            other = x + noise * (0.5 * float(x.abs().max()) + 1e-3)
        else:  # rolled, or each entry moved by one towards 0 when rolling changes nothing
            other = x.roll(1, dims=-1) if x.dim() > 1 else x
            if torch.equal(other, x):
                other = torch.where(x > 0, x - 1, x + 1)
        distinct.append(other)
    return torch.cat(distinct)


def _default_batch_size(engine, k: int, mode: str, dtype: torch.dtype, n: int,
                        positions: bool = False, device: torch.device | None = None) -> int:
    """Largest block whose factors and output tile fit the default memory budgets.

    Wide factors (a per-sample Jacobian of millions of parameters) make that a block of one
    or two samples, whose tiles are GEMMs of K rows that read both blocks from memory for
    few multiply-adds each (ResNet-18's full kernel at N = 16 took 2.5x the recipe's time; the
    MLP's trace at N = 256 in blocks of 22, 13 s against 6.1-7.0 s in blocks of 128). When every
    block's factors fit in half of the memory free now (the column cache keeps them all
    anyway), blocks grow to ``_WIDE_BLOCK`` samples while each fits a quarter with its
    forward's tensors once per output (``engine.activations``, per sample, measured on the
    probe: the K reverse passes of a block run at once), and are made equal (16 samples in two
    blocks of 8, not 13 and 3). A block's peak is its factors and about a third more (timm's
    vit_tiny, N = 16, float32: a 3.5 GB Jacobian in one block, 4.5 GB peak resident memory).
    """
    per_pair = _modes.entries_per_pair(k, mode) * dtype.itemsize
    by_tile = int(math.sqrt(_TILE_BYTES / per_pair))
    per_sample = max(1, engine.bytes_per_sample(k, positions=True)
                     if positions and isinstance(engine, StructuredNTK) else
                     engine.bytes_per_sample(k))
    by_factors = _FACTOR_BYTES // per_sample
    if by_factors < _WIDE_BLOCK and device is not None and not positions:
        free = _free_bytes(device)
        if n * per_sample <= free // 2:
            working = per_sample + k * engine.activations
            wide = max(1, min(n, by_tile, _WIDE_BLOCK, free // 4 // working))
            if wide > by_factors:
                return -(-n // -(-n // wide))   # ceil(n / blocks), blocks = ceil(n / wide)
    return max(1, min(n, by_tile, by_factors))


def _cache_budget(engine, k: int, n2: int, size: int, asked: int | None,
                  device: torch.device) -> int:
    """Bytes of x2's block factors kept for reuse across row blocks.

    A column block that isn't kept is computed again for every row block (about B²/2 factor
    passes instead of B), so by default every column block is kept when they all fit in half
    of the memory free now, and at least ``_CACHE_BYTES`` are. With ``batch_size`` given, the
    caller bounds memory: ``_CACHED_BLOCKS`` blocks.
    """
    per_block = size * engine.bytes_per_sample(k)
    if asked is not None:
        return _CACHED_BLOCKS * per_block
    every = n2 * engine.bytes_per_sample(k)
    return int(max(_CACHE_BYTES, min(every, _free_bytes(device) // 2)))


def _free_bytes(device: torch.device) -> int:
    """Memory free now on the device (0 when unknown)."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        pass
    return 0


def _blocks(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


class _FactorCache:
    """Factors of column blocks, kept while they fit ``budget`` bytes, else recomputed."""

    def __init__(self, compute, x: Tensor, blocks: list[slice], budget: int,
                 side: str) -> None:
        self.compute, self.x, self.blocks, self.budget = compute, x, blocks, budget
        self.side = side
        self.kept: dict[int, object] = {}
        self.bytes = 0

    def get(self, j: int):
        if j in self.kept:
            return self.kept[j]
        block = self.blocks[j]
        factors = self.compute(self.x[block], block.start, self.side)
        size = factors.nbytes()
        if self.bytes + size <= self.budget:
            self.kept[j] = factors
            self.bytes += size
        return factors

    def drop(self, j: int) -> None:
        if j in self.kept:
            self.bytes -= self.kept.pop(j).nbytes()


def _all_finite(t: Tensor) -> bool:
    """Every entry finite: a finite sum says so in one cheap pass (a NaN or inf entry makes
    the sum non-finite); only a non-finite sum (or one that overflowed) looks entry by entry."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _widened(factors: Factors) -> Factors:
    """The same factors in float64 (for a tile whose products overflow the model's dtype)."""
    wide = lambda ts: [t.double() for t in ts]  # noqa: E731
    return Factors(wide(factors.h), wide(factors.d), list(factors.c), list(factors.group),
                   list(factors.tokens), wide(factors.token_d))
