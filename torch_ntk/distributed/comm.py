"""The process group: which one, which device its collectives need, and agreeing on errors.

Every collective here is called by every rank of the group in the same order, so a rank that
fails takes part in the same calls as the others and no rank waits for a call that never
comes. Errors travel as fixed-size byte tensors (the exception's type and message), which
both gloo (CPU tensors) and NCCL (CUDA tensors) can all-gather.
"""
from __future__ import annotations

import torch
from torch import Tensor

_MESSAGE_BYTES = 2048
_TYPES = (ValueError, TypeError, FileNotFoundError, PermissionError, OSError, RuntimeError)


class Comm:
    """A process group and the device its collectives use.

    Attributes:
        group: the ``torch.distributed`` process group (``None``: the default group).
        rank, world (int): this process's rank in ``group`` and the group's size.
        device (torch.device): ``cuda`` for NCCL, ``cpu`` otherwise.
    """

    def __init__(self, caller: str, group, compute_device: torch.device) -> None:
        import torch.distributed as dist
        if not dist.is_available():
            raise RuntimeError(f"{caller}: this build of torch has no torch.distributed; use "
                               f"torch_ntk.{caller.split('.')[-1]} in a single process.")
        if not dist.is_initialized():
            raise RuntimeError(
                f"{caller}: no process group is initialised. Call "
                "torch.distributed.init_process_group(backend='gloo' or 'nccl') on every rank "
                "first (torchrun sets up the environment for it), or use "
                f"torch_ntk.{caller.split('.')[-1]} in a single process.")
        self.dist, self.group, self.caller = dist, group, caller
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        backend = str(dist.get_backend(group)).lower()
        if "nccl" in backend:
            self.device = (compute_device if compute_device.type == "cuda"
                           else torch.device("cuda", torch.cuda.current_device()))
        else:
            self.device = torch.device("cpu")

    def all_gather(self, t: Tensor) -> list[Tensor]:
        """Every rank's ``t`` (same shape and dtype on every rank), in rank order."""
        t = t.to(self.device).contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world)]
        self.dist.all_gather(parts, t, group=self.group)
        return parts

    def agree(self, error: BaseException | None, what: str, *, root_decides: bool = False
              ) -> None:
        """Raises on every rank if ``error`` is set on any rank; returns on all ranks otherwise.

        A failing rank re-raises its own exception; the others raise one of the same type
        (RuntimeError for unknown types) with the first failing rank's message.

        Args:
            error: this rank's exception, or ``None``.
            what (str): the stage, named in the other ranks' message.
            root_decides (bool): only rank 0 decides (e.g. checks of ``path``); every rank
                then raises the very same exception type and message.
        """
        parts = self.all_gather(_encode(error))
        failed = [(r, _decode(p)) for r, p in enumerate(parts) if int(p[0]) != 0]
        if not failed:
            return
        if error is not None:
            raise error
        rank, (cls, message) = failed[0]
        if root_decides:
            raise cls(message)
        raise cls(f"{message} [raised on rank {rank} while {what}; rank {self.rank} stops too]")


# Internal helpers

def _encode(error: BaseException | None) -> Tensor:
    """(flag, type index, length hi, length lo, utf-8 message...) as a uint8 tensor."""
    buf = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
    if error is None:
        return buf
    kind = next((i for i, cls in enumerate(_TYPES) if type(error) is cls), len(_TYPES) - 1)
    text = f"{error}" if type(error) in _TYPES else f"{type(error).__name__}: {error}"
    data = text.encode("utf-8")[:_MESSAGE_BYTES - 4]
    buf[0], buf[1], buf[2], buf[3] = 1, kind, len(data) >> 8, len(data) & 255
    buf[4:4 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return buf


def _decode(buf: Tensor) -> tuple[type, str]:
    buf = buf.cpu()
    n = (int(buf[2]) << 8) | int(buf[3])
    text = bytes(buf[4:4 + n].tolist()).decode("utf-8", errors="replace")
    return _TYPES[int(buf[1])], text
