"""method="jacobian": the torch.func reference (functional_call + vmap(jacrev)).

Works for any model whose samples don't interact. Per block of inputs it forms the
per-sample Jacobian ``J (n, K, P)`` and contracts it; memory is ``O(n·K·P)`` per block,
so callers tile the inputs.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from torch_ntk.empirical import checks


class JacobianNTK:
    """Reference NTK engine: factors are per-sample Jacobians, contracted with einsum."""

    name = "jacobian"

    def __init__(self, model: nn.Module, params: Mapping[str, Tensor]) -> None:
        self.model = model
        self.params = dict(params)
        self.num_params = sum(p.numel() for p in self.params.values())

    def bytes_per_sample(self, k: int) -> int:
        itemsize = next(iter(self.params.values())).element_size()
        return k * self.num_params * itemsize

    def factors(self, x: Tensor) -> Tensor:
        """Tensor[n, K, P]: ∂f_a(x_n)/∂θ_p over the trainable parameters."""
        return per_sample_jacobian(self.model, self.params, x)

    def contract(self, j1: Tensor, j2: Tensor, mode: str, out: Tensor,
                 symmetric: bool = False) -> Tensor:
        """Writes Σ_p J1[n, a, p] J2[m, b, p] (reduced per ``mode``) into ``out``."""
        return out.copy_(contract_jacobians(j1, j2, mode))


def per_sample_jacobian(model: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Jacobian of the flattened per-sample output w.r.t. ``params``.

    Args:
        model (nn.Module): the network; parameters not in ``params`` are held fixed.
        params (dict of Tensor): the parameters to differentiate, by their model names.
        x (Tensor[n, *in_shape]): a batch of inputs.
    Returns:
        Tensor[n, K, P]: P = total size of ``params`` (in insertion order, each flattened).
    """
    n = x.shape[0]
    detached = {name: p.detach() for name, p in params.items()}

    def f_single(theta: dict[str, Tensor], xi: Tensor) -> tuple[Tensor, Tensor]:
        y = functional_call(model, theta, (xi.unsqueeze(0),), strict=False).reshape(-1)
        return y, y

    with torch.no_grad():
        jac, f = vmap(jacrev(f_single, has_aux=True), in_dims=(None, 0))(detached, x)
    checks.check_output(f, n, "these inputs")
    k = f.shape[1]
    return torch.cat([jac[name].reshape(n, k, -1) for name in detached], dim=2)


def contract_jacobians(j1: Tensor, j2: Tensor, mode: str) -> Tensor:
    """NTK block from two Jacobian blocks J1 (N1, K, P), J2 (N2, K, P).

    Returns:
        Tensor: ``"full"`` -> [N1, N2, K, K], ``"trace"`` -> [N1, N2], ``"diagonal"`` -> [N1, N2, K].
    """
    if mode == "full":
        return torch.einsum("nap,mbp->nmab", j1, j2)
    if mode == "trace":
        return torch.einsum("nap,map->nm", j1, j2)
    return torch.einsum("nap,map->nma", j1, j2)
