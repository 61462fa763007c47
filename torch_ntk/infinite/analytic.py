"""Infinite-width NNGP and NTK of fully-connected networks (Jacot et al. 2018).

The network has ``depth`` affine layers in the NTK parameterisation
``z_l = w_std / sqrt(n_{l-1}) · W_l h_{l-1} + b_std · b_l`` with ``W_l, b_l ~ N(0, 1)`` and
``h_l = φ(z_l)`` after every layer but the last. As the widths grow, the output covariance
``Σ_L`` (NNGP) and the NTK ``Θ_L`` become deterministic (https://arxiv.org/abs/1806.07572)::

    Σ_1 = w_std² · x·x' / n0 + b_std²,            Θ_1 = Σ_1,
    Σ_l = w_std² · E[φ(u) φ(v)] + b_std²,         Σ̇_l = w_std² · E[φ'(u) φ'(v)],
    Θ_l = Θ_{l-1} · Σ̇_l + Σ_l,

with ``(u, v) ~ N(0, [[Σ_{l-1}(x, x), Σ_{l-1}(x, x')], [Σ_{l-1}(x, x'), Σ_{l-1}(x', x')]])``.

The same recursion, generalised to positions (convolutions, pooling, LayerNorm, residual sums),
gives the limit of any network built from NTK layers: ``analytic_ntk(model, x)`` reads the
module's forward into a program of rules (``program``, ``rules/``) and runs it over tiles of
input pairs (``engine``). The ``depth=`` form is the program of the fully-connected network.
ReLU, leaky ReLU, erf and the identity have closed forms, every other activation the Hermite
expansion (``rules/activations.py``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from torch_ntk.infinite import engine, program
from torch_ntk.infinite.checks import (ACTIVATIONS, GETS, ActivationLike, _check_get,  # noqa: F401
                                       _check_inputs, _check_int, _check_model_inputs,
                                       _check_options, _check_std, _kernels_type,
                                       resolve_activation)
from torch_ntk.infinite.rules.activations import (CLOSED_FORMS, DEFAULT_QUADRATURE_DEGREE,
                                                  ClosedForm, Hermite)

_UNSET = object()


def analytic_ntk(x1, *args, x2: Optional[Tensor] = None, depth: Optional[int] = None,
                 activation=_UNSET, w_std=_UNSET, b_std=_UNSET,
                 get: Union[str, Sequence[str]] = "ntk",
                 quadrature_degree: int = DEFAULT_QUADRATURE_DEGREE,
                 batch_size: Optional[int] = None) -> Union[Tensor, NamedTuple]:
    """Infinite-width NTK Θ∞ (or NNGP Σ_L) of a fully-connected network with ``depth`` layers,
    or of a module built from NTK layers: ``analytic_ntk(model, x1, x2=None, *, get="ntk",
    batch_size=None)``.

    The module form reads ``model``'s forward by tracing it (``torch.fx``) and returns the
    limit as the channels (features) of every NTK layer but the last go to infinity:
    ``NTKLinear``, ``NTKConv1d``/``NTKConv2d``, ``NTKMLP``; elementwise activations
    (``nn.ReLU``, ``nn.LeakyReLU``, ``nn.Tanh``, ``nn.Sigmoid``, ``nn.GELU``, ``nn.SiLU``,
    ``nn.Softplus``, ``nn.Identity``, ``torch_ntk.Erf``); ``nn.AvgPool1d/2d`` (padding 0),
    ``nn.AdaptiveAvgPool1d/2d(1)``, ``nn.Flatten``, ``nn.LayerNorm`` without affine parameters
    (over all non-batch axes, after a layer whose output has zero channel mean),
    ``nn.Dropout`` (the identity), and sums of branches such as ``x + block(x)``. Inputs are
    in the model's own layout, (N, C, L) or (N, C, H, W) or (N, features); the result is
    (N1, N2) per output (the outputs are i.i.d.). Without pooling only each position's
    covariance with itself is tracked, O(P) per pair of inputs; pooling needs all pairs of
    positions, O(P²). Anything else is a ValueError naming the module; use
    ``torch_ntk.monte_carlo_ntk`` for it.

    The network is the one built by ``NTKMLP(n0, width, depth, activation=..., w_std=...,
    b_std=...)``: ``empirical_ntk(model, x, mode="trace") / out_features`` converges to this
    kernel as ``width`` grows. Values match neural-tangents'
    ``stax.serial(Dense(n, w_std, b_std), act, ..., Dense(k, w_std, b_std))``.

    Args:
        x1 (Tensor[N1, n0]): first batch of inputs (floating point, finite); in the module
            form, the module, then ``x1`` (Tensor[N1, *in_shape]) and ``x2``.
        x2 (Tensor[N2, n0], optional): second batch; ``None`` means ``x1`` and computes only
            half of the (symmetric) kernel.
        depth (int): number of affine layers L ≥ 1; ``depth=1`` is a linear model.
        activation (str or callable): ``"relu"``, ``"erf"``, ``"identity"`` (closed forms);
            ``"tanh"``, ``"gelu"`` (exact, erf-based), ``"sigmoid"``, ``"softplus"`` or any
            elementwise callable ``Tensor -> Tensor`` (Hermite expansion; the derivative comes
            from autograd).
        w_std (float): weight standard deviation multiplier (≥ 0).
        b_std (float): bias standard deviation (≥ 0); 0 means no bias contribution.
        get (str or sequence of str): ``"ntk"`` -> Θ_L, ``"nngp"`` -> Σ_L; a tuple such as
            ``("nngp", "ntk")`` returns a namedtuple with those fields, in that order.
        quadrature_degree (int): number n of Gauss-Hermite nodes of the 1-D rule used for the
            Hermite coefficients (non-closed-form activations only); the series is summed to
            at most ``n // 2`` terms, so a pair costs ``O(n)`` per layer. At the default 256,
            tanh at depth 3 is accurate to ~1e-15 relative with unit-variance inputs, ~1e-10
            with ``w_std=1.5`` and ~5e-8 with ``w_std=2``; raise it when pre-activation standard
            deviations exceed about 2 (the integrand then varies on a scale ``1/σ`` that needs
            more nodes). Activations with a kink (relu as a callable) converge like ``1/n``.
        batch_size (int, optional): tile side; at most ``batch_size`` inputs of each side are
            processed at once (memory ``O(batch_size² · P²)`` besides the output, P the most
            positions of a layer that keeps position pairs). Default: 181 on CPU for
            fully-connected networks, tiles processed in parallel by
            ``torch.get_num_threads()`` threads; smaller for networks with positions (tiles of
            about 2¹⁹ entries per kernel); 4096 on other devices.
    Returns:
        Tensor[N1, N2]: the kernel asked for by ``get``, or a namedtuple of them; dtype and
        device of ``x1`` (float16/bfloat16 inputs are computed in float32 and cast back).
    Raises:
        TypeError: inputs that are not floating-point tensors, an activation that is neither a
            known name nor a callable, a callable that is not elementwise, options of the wrong
            type (e.g. a float ``depth``).
        ValueError (module form): a module or operation without an infinite-width rule (named
            in the message), a sum of branches that are not independent at infinite width,
            shapes that don't fit the layers, ``depth``/``activation``/``w_std``/``b_std``
            given with a module.
        ValueError: ``depth < 1``, unknown activation name or ``get``, mismatched feature sizes,
            inputs on different devices or with different dtypes, non-finite inputs, negative or
            non-finite ``w_std``/``b_std``, bad ``quadrature_degree``/``batch_size``.
    Example:
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> torch_ntk.analytic_ntk(x, depth=3, activation="relu").shape
        torch.Size([5, 5])
        >>> k = torch_ntk.analytic_ntk(x, x[:2], depth=2, activation="tanh", get=("nngp", "ntk"))
        >>> k.nngp.shape, k.ntk.shape
        (torch.Size([5, 2]), torch.Size([5, 2]))
        >>> net = nn.Sequential(torch_ntk.NTKConv2d(1, 64, 3, padding="same"), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), torch_ntk.NTKLinear(64, 1))
        >>> torch_ntk.analytic_ntk(net, torch.randn(4, 1, 8, 8, dtype=torch.float64)).shape
        torch.Size([4, 4])
    """

    if isinstance(x1, nn.Module):
        if len(args) > 2 or (len(args) == 2 and x2 is not None) or not args:
            raise TypeError("analytic_ntk(model, x1, x2=None, *, get='ntk', batch_size=None): "
                            f"expected the inputs after the model, got {len(args)} more "
                            f"positional arguments.")
        given = [name for name, v in (("depth", depth), ("activation", activation),
                                      ("w_std", w_std), ("b_std", b_std))
                 if v is not None and v is not _UNSET]
        if given or quadrature_degree != DEFAULT_QUADRATURE_DEGREE:
            given += ["quadrature_degree"] if quadrature_degree != DEFAULT_QUADRATURE_DEGREE else []
            raise ValueError(f"analytic_ntk: {', '.join(given)} describe the fully-connected "
                             f"form analytic_ntk(x, depth=...); with a module the layers and "
                             f"their w_std/b_std come from the module itself.")
        return _module_ntk(x1, args[0], args[1] if len(args) == 2 else x2, get, batch_size)
    if len(args) > 1 or (args and x2 is not None):
        raise TypeError(f"analytic_ntk(x1, x2=None, *, depth, ...): got {1 + len(args)} "
                        f"positional inputs.")
    x2 = args[0] if args else x2
    if depth is None:
        raise TypeError("analytic_ntk: give depth= (the number of affine layers) for the "
                        "fully-connected form, or a module first: analytic_ntk(model, x).")
    activation = "relu" if activation is _UNSET else activation
    w_std = 1.0 if w_std is _UNSET else w_std
    b_std = 0.0 if b_std is _UNSET else b_std
    fields = _check_get(get)
    name, fn = resolve_activation(activation, caller="analytic_ntk")
    _check_options(depth, w_std, b_std, quadrature_degree, batch_size)
    x1, x2_checked = _check_inputs(x1, x2)
    if name in CLOSED_FORMS:
        act = ClosedForm(name)
    else:
        label = name or getattr(fn, "__name__", "the activation")
        act = Hermite(fn, label, degree=quadrature_degree, odd=name == "tanh")
    net = program.plan(program.mlp(depth, x1.shape[1], act, float(w_std), float(b_std)),
                       (x1.shape[1],))
    return _compute(net, x1, None if x2 is None else x2_checked, fields, get, batch_size)


def _module_ntk(model: nn.Module, x1, x2, get, batch_size) -> Union[Tensor, NamedTuple]:
    """The module form: trace, plan, compute."""
    fields = _check_get(get)
    if batch_size is not None:
        _check_int("analytic_ntk", "batch_size", batch_size, 1, "or None for the default")
    x1, x2 = _check_model_inputs(x1, x2)
    net = program.plan(program.trace(model), tuple(x1.shape[1:]))
    return _compute(net, x1, x2, fields, get, batch_size)


def _compute(net: program.Program, x1: Tensor, x2: Optional[Tensor], fields: Tuple[str, ...],
             get, batch_size: Optional[int]) -> Union[Tensor, NamedTuple]:
    out_dtype = x1.dtype
    work = x1.dtype if x1.dtype in (torch.float32, torch.float64) else torch.float32
    x1 = x1.to(work)
    x2 = None if x2 is None else x2.to(work)
    n2 = x1.shape[0] if x2 is None else x2.shape[0]
    outs = {f: torch.empty(x1.shape[0], n2, dtype=work, device=x1.device) for f in fields}
    engine.kernels(net, x1, x2, fields, batch_size, outs)
    outs = {f: o.to(out_dtype) for f, o in outs.items()}
    if len(fields) == 1 and isinstance(get, str):
        return outs[fields[0]]
    return _kernels_type(fields)(*(outs[f] for f in fields))
