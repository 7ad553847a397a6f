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
from torch import nn

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
            log.warning(
                "%d processes on this machine but %d GPU(s): training on the CPU (gloo); "
                "launch one process per GPU to use them",
                local_world,
                gpus,
            )
        return torch.device("cpu")
    if spec != "cuda":
        raise TransformerError(
            f"device {spec!r}: under torchrun each process takes the GPU of its local rank; use cuda (or auto)"
        )
    if gpus < local_world:
        raise TransformerError(
            f"device cuda: {local_world} processes on this machine need {local_world} GPUs, "
            f"found {gpus}; use --nproc-per-node {max(gpus, 1)} or device cpu"
        )
    return torch.device("cuda", local_rank)


def is_main_process() -> bool:
    """Is this process rank 0 of torchrun's (or not under torchrun at all)? Only rank 0 shows progress, prints
    results and writes the run's files."""
    return os.environ.get("RANK", "0") == "0"


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


# ----------------------------------------------------------------------------------------------------------
# The model across processes: replicated (DDP) or sharded (FSDP2)


def data_parallel(model: nn.Module, step_module: nn.Module, dist: Distributed, fsdp: bool) -> nn.Module:
    """The module the trainer calls for a step's loss. `step_module` computes the loss with `model`; across
    processes it is wrapped in DistributedDataParallel (gradients averaged), or `model`'s layers are sharded
    with FSDP2's `fully_shard` (one unit per layer). One process: `step_module` itself."""
    if fsdp:
        _shard(model, dist)
        return step_module
    if dist.world == 1:
        return step_module
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(step_module, device_ids=ids)


def _shard(model: nn.Module, dist: Distributed) -> None:
    try:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    except ImportError:
        raise TransformerError(
            f"--fsdp needs FSDP2's fully_shard (torch >= 2.6); the installed torch is {torch.__version__}"
        ) from None
    if dist.world < 2:
        raise TransformerError("--fsdp shards parameters across processes: launch with torchrun --nproc-per-node N")
    from .layers import TransformerLayer

    for module in model.modules():
        if isinstance(module, TransformerLayer):
            fully_shard(module)
    fully_shard(model)
    register_fsdp_forward_method(model, "loss")  # the trainer calls model.loss, not model(...)


def full_state_dict(model: nn.Module, fsdp: bool) -> dict:
    """The whole model's weights: its own state dict, or with FSDP gathered from every process (a collective
    call; every process must make it) onto the CPU."""
    if not fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict:
    """The optimizer state keyed by parameter name (not by position), so that it loads whatever the process
    count or sharding. With FSDP a collective call."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, optimizer, options=opts)
    sd = optimizer.state_dict()
    names = _param_names(model, optimizer)
    return {
        "state": {names[i]: v for i, v in sd["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]],
    }


def load_named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, named: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))
        return
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    optimizer.load_state_dict(
        {
            "state": {index[n]: v for n, v in named["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]],
        }
    )


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's own numbering (group by group)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
