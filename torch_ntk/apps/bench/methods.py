"""The empirical-NTK suite: methods side by side on the benchmark models, shared by ``bench``
and benchmarks/.

The methods are first checked to agree with the jacobian reference on a small float64 input in
this process, with the native Gram-sum op switched off for ``structured-torch`` and the
backend that ran recorded per method. Then every (method, N, mode) is timed in a fresh
process (``harness.run_isolated``) so that its peak RSS is its own; a measurement that fails
or runs past the time limit is reported as such and the suite goes on.
"""
from __future__ import annotations

import torch
from torch import nn

from torch_ntk.apps.bench import harness, models
from torch_ntk.apps.machine import machine_info, total_memory_gib
from torch_ntk.native import route

MLP_WIDTHS = models.MLP_WIDTHS
# The MLP suite's methods (the default of ``python -m torch_ntk bench``).
METHODS = ("structured", "structured-torch", "jacobian", "func-jacrev", "func-ntk-vp")
# The model zoo's methods (``bench --models ...``).
ZOO_METHODS = ("auto", "structured", "jacobian", "func-jacrev")
ALL_METHODS = ("auto",) + METHODS
# Peak memory of a method relative to one full Jacobian N·K·P (measured once, rounded up).
_JACOBIAN_COPIES = {"func-jacrev": 1.6, "func-ntk-vp": 1.3}
_AGREEMENT_N = {"resnet18": 2}  # inputs of the float64 agreement check (default 8)
_AGREEMENT_TOL = 1e-9
_NO_NATIVE_ENV = {"TORCH_NTK_DISABLE_NATIVE": None}  # workers decide per method themselves


def mlp(dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """The benchmark MLP, seeded."""
    return models.mlp(dtype, device)


def kernel(method: str, model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """The NTK of ``model`` on ``x`` (x2 = x1) by one of ``ALL_METHODS``.

    ``structured-torch`` is ``structured`` with the native op switched off for the call.
    """
    import torch_ntk
    if method in ("auto", "structured", "jacobian"):
        return torch_ntk.empirical_ntk(model, x, mode=mode, method=method)
    if method == "structured-torch":
        with route.native_disabled():
            return torch_ntk.empirical_ntk(model, x, mode=mode, method="structured")
    if method == "func-jacrev":
        return _func_jacrev(model, x, mode)
    if method == "func-ntk-vp":
        return _func_ntk_vp(model, x, mode)
    raise ValueError(f"unknown benchmark method {method!r}; expected one of {ALL_METHODS}")


def run_suite(sizes=(64, 256, 1024), modes=("full", "trace"), methods=METHODS,
              device: str = "cpu", repeats: int = 3, memory_limit_gib: float | None = None,
              time_limit_s: float | None = 240.0, model: str = "mlp",
              check_n: int | None = None, log=print) -> dict:
    """Times every method on one benchmark model; returns a JSON-ready dict.

    Args:
        sizes, modes, methods: the grid; each cell runs in its own process.
        memory_limit_gib (float, optional): skip Jacobian-forming recipes needing more
            (default 70 % of this machine's memory).
        time_limit_s (float, optional): wall-time limit per measurement (process included).
        model (str): a name of ``models.MODELS``.
        check_n (int, optional): inputs of the float64 agreement check (default 8,
            resnet18 2); it runs the same modes.
    Returns:
        dict: machine, model, agreement (max relative difference to the jacobian reference
        per ``method/mode``), agreement_backend (which Gram-sum backend ran: ``native``,
        ``torch``, ``native+torch`` or ``none``), load_average_1min (before, after), rows.
    """
    load_before = harness.load_average()
    memory_limit = (memory_limit_gib or 0.7 * total_memory_gib()) * 2 ** 30
    check_n = check_n or _AGREEMENT_N.get(model, 8)
    log(f"{model}: checking that {', '.join(methods)} agree on N={check_n} ...")
    check = check_agreement(methods, device, model, check_n, modes)
    net = models.build(model)
    p = sum(q.numel() for q in net.parameters())
    rows = []
    for n in sizes:
        for mode in modes:
            for method in methods:
                row = dict(model=model, method=method, n=n, mode=mode)
                need = _JACOBIAN_COPIES.get(method, 0.0) * n * models.K * p * 4
                if method in check["failed"]:
                    row["skipped"] = check["failed"][method]
                elif need > memory_limit:
                    row["skipped"] = (f"needs about {need / 2 ** 30:.0f} GiB, limit "
                                      f"{memory_limit / 2 ** 30:.0f} GiB")
                else:
                    row.update(harness.run_isolated(
                        "torch_ntk.apps.bench.methods:measure",
                        dict(model=model, method=method, n=n, mode=mode, device=device,
                             repeats=repeats), timeout=time_limit_s, env=_NO_NATIVE_ENV))
                rows.append(row)
                log(_format_log(row))
    return dict(machine=machine_info(device), model=models.describe(model),
                agreement=check["agreement"], agreement_backend=check["backend"],
                load_average_1min=[load_before, harness.load_average()], rows=rows)


def run_zoo(names=("mlp",), sizes=None, modes=("full",), methods=ZOO_METHODS,
            device: str = "cpu", repeats: int = 3, time_limit_s: float | None = 240.0,
            check_n: int | None = None, log=print) -> dict:
    """``run_suite`` for each zoo model (``sizes`` None: the model's ``DEFAULT_SIZES``).

    Returns:
        dict: machine, load_average_1min (before, after), models: name -> ``run_suite``
        result, or ``{"skipped": why}`` when the model cannot be built here.
    """
    load_before = harness.load_average()
    result: dict = dict(machine=machine_info(device), models={})
    for name in names:
        if name == "resnet18" and models.torchvision_missing():
            result["models"][name] = {"skipped": models.torchvision_missing()}
            log(f"resnet18 skipped: {result['models'][name]['skipped']}")
            continue
        result["models"][name] = run_suite(
            sizes=tuple(sizes or models.DEFAULT_SIZES[name]), modes=modes, methods=methods,
            device=device, repeats=repeats, time_limit_s=time_limit_s, model=name,
            check_n=check_n, log=log)
    result["load_average_1min"] = [load_before, harness.load_average()]
    return result


def format_table(result: dict, baseline: str = "structured") -> str:
    """Markdown table with time, peak RSS, backend and each method's time over ``baseline``."""
    base = {(r["n"], r["mode"]): r["seconds"] for r in result["rows"]
            if r["method"] == baseline and "seconds" in r}
    lines = [f"| N | mode | method | time (s) | peak RSS (GiB) | Gram sums | "
             f"time / {baseline} |", "|---:|---|---|---:|---:|---|---:|"]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['n']} | {r['mode']} | {r['method']} | {r['skipped']} | | | |")
            continue
        ratio = r["seconds"] / base[(r["n"], r["mode"])] if (r["n"], r["mode"]) in base else None
        lines.append(f"| {r['n']} | {r['mode']} | {r['method']} | {r['seconds']:.3f} | "
                     f"{r['peak_rss_gib']:.2f} | {r.get('backend', '')} | "
                     f"{'' if ratio is None else f'{ratio:.1f}x'} |")
    return "\n".join(lines)


def format_zoo(result: dict) -> str:
    """One table per zoo model, headed by its description."""
    parts = []
    for name, res in result["models"].items():
        if "skipped" in res:
            parts.append(f"### {name}\n\nskipped: {res['skipped']}")
        else:
            parts.append(f"### {name}: {res['model']}\n\n{format_table(res)}")
    return "\n\n".join(parts)


def measure(model: str, method: str, n: int, mode: str, device: str = "cpu",
            repeats: int = 3) -> dict:
    """Worker (run in a fresh process): times one (model, method, N, mode).

    Returns:
        dict: seconds (median after a warm-up on 8 inputs), repeats, seconds_all,
        peak_rss_gib (this process), backend (Gram sums run by the timed calls).
    """
    net = models.build(model, device=device)
    x = models.inputs(model, n, device=device)
    before = _backend_counts(device)
    timing = harness.median_time(lambda: kernel(method, net, x, mode), repeats=repeats,
                                 warmup=lambda: kernel(method, net, x[:8], mode),
                                 device=device)
    return dict(timing, peak_rss_gib=harness.peak_rss_gib(),
                backend=_backend_name(before, _backend_counts(device)))


def check_agreement(methods, device: str = "cpu", model: str = "mlp", n: int = 8,
                    modes=("full", "trace")) -> dict:
    """Each method against the jacobian reference on ``n`` float64 inputs, in this process.

    ``structured-torch`` runs with the native op switched off and must run only pure-torch
    Gram sums; on a CPU with the native op available ``structured`` must run only native ones.

    Returns:
        dict: agreement (``method/mode`` -> max relative difference), backend
        (``method/mode`` -> Gram-sum backend), failed (method -> ``"failed: ..."`` for a
        method that raised on this model).
    Raises:
        RuntimeError: a method disagrees with the reference, or ran the wrong backend.
    """
    net = models.build(model, torch.float64, device)
    x = models.inputs(model, n, torch.float64, device, seed=2)
    report: dict = dict(agreement={}, backend={}, failed={})
    for mode in modes:
        try:
            ref = kernel("jacobian", net, x, mode)
        except Exception as err:  # noqa: BLE001 - a model no method handles is reported
            report["failed"].update({m: _failed(err) for m in methods})
            return report
        for method in methods:
            if method in report["failed"]:
                continue
            before = _backend_counts(device)
            try:
                got = kernel(method, net, x, mode)
            except Exception as err:  # noqa: BLE001 - reported per method, the suite goes on
                report["failed"][method] = _failed(err)
                continue
            backend = _backend_name(before, _backend_counts(device))
            _check_backend(method, backend, device)
            err = float((got - ref).abs().max() / ref.abs().max())
            if not err <= _AGREEMENT_TOL:
                raise RuntimeError(f"benchmark methods disagree on {model}: {method} ({mode}) "
                                   f"differs from the jacobian reference by {err:.2e} "
                                   "(relative)")
            report["agreement"][f"{method}/{mode}"] = err
            report["backend"][f"{method}/{mode}"] = backend
    return report


# Internal helpers

def _func_jacrev(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """torch.func recipe: whole-batch per-sample Jacobians, then one einsum."""
    from torch.func import functional_call, jacrev, vmap
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(theta, xi):
        return functional_call(model, theta, (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(f), (None, 0))(params, x)
    jac = [j.flatten(2) for j in jac.values()]
    eq = "Naf,Mbf->NMab" if mode == "full" else "Naf,Maf->NM"
    return sum(torch.einsum(eq, j, j) for j in jac)


def _func_ntk_vp(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """torch.func recipe: NTK-vector products (vjp then jvp) for every output basis vector."""
    from torch.func import functional_call, jvp, vjp, vmap
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(theta):
        return functional_call(model, theta, (x,))

    out, vjp_fn = vjp(f, params)
    n, k = out.shape

    def ntk_column(vec):
        (cotangent,) = vjp_fn(vec.reshape(n, k))
        return jvp(f, (params,), (cotangent,))[1]

    basis = torch.eye(n * k, dtype=out.dtype, device=out.device)
    cols = vmap(ntk_column)(basis).reshape(n, k, n, k).permute(0, 2, 1, 3)
    return cols if mode == "full" else torch.diagonal(cols, dim1=2, dim2=3).sum(-1)


def _backend_counts(device: str) -> tuple[int, int]:
    kind = torch.device(device).type
    return route.calls["native", kind], route.calls["torch", kind]


def _backend_name(before: tuple[int, int], after: tuple[int, int]) -> str:
    """Which Gram-sum backends ran between two ``_backend_counts``."""
    ran = [name for name, b, a in zip(("native", "torch"), before, after) if a > b]
    return "+".join(ran) or "none"


def _check_backend(method: str, backend: str, device: str) -> None:
    """structured-torch must run pure torch only; structured the native op (CPU) only."""
    if method == "structured-torch" and backend != "torch":
        raise RuntimeError(f"structured-torch ran Gram sums on {backend!r}, expected only "
                           "'torch': the native op was not switched off")
    native_cpu = torch.device(device).type == "cpu" and route.native_available("cpu")
    if method == "structured" and native_cpu and backend != "native":
        raise RuntimeError(f"structured ran Gram sums on {backend!r}, expected only 'native' "
                           "(the native op is available on this CPU)")


def _failed(err: Exception) -> str:
    return f"failed: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def _format_log(row: dict) -> str:
    head = f"{row['model']:>11} {row['method']:>16} N={row['n']:<6} {row['mode']:<5}"
    if "skipped" in row:
        return f"{head} {row['skipped']}"
    return (f"{head} {row['seconds']:9.3f} s  peak RSS {row['peak_rss_gib']:6.2f} GiB  "
            f"Gram sums: {row['backend']}")
