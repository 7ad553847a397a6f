"""The process group: one process per device under torchrun, or a single process that does nothing here.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE. Each process takes the GPU of its local rank
when there is one GPU per local process (nccl), and the CPU otherwise (gloo): a one-GPU machine running two
processes trains on its CPU rather than putting both on one GPU.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from .backend import resolve_device
from .errors import TransformerError

log = logging.getLogger("transformer")


def _process_device(spec: str, local_rank: int, local_world: int) -> torch.device:
    """The device of this process for the setting `spec` ("auto", "cpu", "cuda", "cuda:N")."""
    if local_world == 1:
        return resolve_device(spec)
    spec = (spec or "auto").lower()
    if spec == "cpu":
        return torch.device("cpu")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "auto":
        if gpus >= local_world:
            return torch.device("cuda", local_rank)
        if gpus:
            log.warning("%d processes on this machine but %d GPU(s): training on the CPU (gloo); "
                        "launch one process per GPU to use them", local_world, gpus)
        return torch.device("cpu")
    if spec != "cuda":
        raise TransformerError(f"device {spec!r}: under torchrun each process takes the GPU of its local rank; "
                               "use cuda (or auto)")
    if gpus < local_world:
        raise TransformerError(f"device cuda: {local_world} processes on this machine need {local_world} GPUs, "
                               f"found {gpus}; use --nproc-per-node {max(gpus, 1)} or device cpu")
    return torch.device("cuda", local_rank)


class Distributed:
    """Data-parallel context from torchrun's environment: this process's rank, the number of processes, its
    device, and the few collectives the trainer needs. Without torchrun: rank 0 of 1, and nothing happens."""

    def __init__(self, device: str = "auto") -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        self.device = _process_device(device, self.local_rank, local_world)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        """The sum of `value` over all processes."""
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj` (a picklable Python object), in rank order, on every process."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out
