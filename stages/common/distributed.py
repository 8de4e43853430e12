"""Data-parallel training with torchrun: the process group, the relaunch, and losses over the global batch.

`pretrain.distributed` / `train.distributed`:
    nproc_per_node: 1     one process (no torch.distributed at all)
    nproc_per_node: N     `python -m stages.train ...` relaunches itself as `torchrun --standalone
                          --nproc-per-node N -m stages.train ...` (one process per GPU, or N CPU processes)
Several nodes: start `torchrun --nnodes M --nproc-per-node N --rdzv-endpoint HOST:PORT -m stages.train ...` on
every node yourself (docs/scaling.md); a stage that finds torchrun's environment (LOCAL_RANK) never relaunches.

`batch_size` is the global batch: each of the W ranks takes batch_size / W samples. In-batch losses (BBC,
soft triplet, VAL's, AMC's, NCE, VSE) see the embeddings of every rank (`across_ranks`), so W processes take
the same optimiser steps as one process with the whole batch.
"""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field
from typing_extensions import Annotated

from stages.common.params import ParamsError, section


@section
class DistributedConfig:
    nproc_per_node: Annotated[int, Field(gt=0)]  # processes on this machine; > 1 relaunches under torchrun
    backend: Literal["auto", "nccl", "gloo"]     # auto: nccl on CUDA, gloo on the CPU


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """The world torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK); one process otherwise."""
    if "LOCAL_RANK" not in os.environ:
        return World()
    return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))


def relaunch_under_torchrun(cfg: DistributedConfig, module: str, argv: list[str]) -> int | None:
    """With nproc_per_node > 1 and not already under torchrun: run `module` under torchrun, return its exit code.
    None means: go on in this process."""
    if cfg.nproc_per_node == 1 or "LOCAL_RANK" in os.environ:
        return None
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.nproc_per_node}",
               "-m", module, *argv]
    print(f"{module}: {cfg.nproc_per_node} processes: {' '.join(command[1:])}", flush=True)
    return subprocess.run(command).returncode


def start(world: World, cfg: DistributedConfig, device: torch.device) -> torch.device:
    """Join the process group (a no-op for one process); returns this rank's device."""
    if world.size == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return device


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_batch(batch_size: int, section_name: str) -> int:
    """This rank's share of the global batch."""
    world = size()
    if batch_size % world:
        raise ParamsError(f"{section_name}.batch_size={batch_size} is the global batch and must divide by the "
                          f"{world} processes")
    return batch_size // world


def gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's `x` stacked along dim 0 in rank order; this rank's rows keep their gradient."""
    if not dist.is_initialized():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def gather_objects(items: list) -> list:
    """Every rank's list of picklable items, concatenated in rank order."""
    if not dist.is_initialized():
        return items
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def across_ranks(loss_fn: Callable[..., torch.Tensor], *tensors) -> torch.Tensor:
    """loss_fn over the global batch: each tensor (or list of tensors) gathered from every rank.

    Rank r back-propagates only through its own rows, and DDP averages the W ranks' gradients; the gradient
    is scaled by W so that the average is the whole batch's gradient. The loss value is unchanged.
    """
    if not dist.is_initialized():
        return loss_fn(*tensors)
    gathered = [[gather(t) for t in x] if isinstance(x, (list, tuple)) else gather(x) for x in tensors]
    return _ScaleGradient.apply(loss_fn(*gathered), dist.get_world_size())


def broadcast(obj):
    """Rank 0's `obj` on every rank (e.g. a resume checkpoint only rank 0 reads)."""
    if not dist.is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def mean_over_ranks(value: float) -> float:
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
