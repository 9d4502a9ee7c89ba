"""Data-parallel helpers for runs launched with ``torchrun`` (one process per GPU, or gloo on CPU)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: str) -> tuple[int, int]:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1); returns (rank, world size)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return world()


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def average_gradients(params) -> None:
    """All-reduce (mean) the gradients of ``params`` across ranks: what DDP does, for modules whose frozen
    backbone should not be registered with DDP."""
    size = world()[1]
    if size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad /= size


def broadcast_parameters(params) -> None:
    if world()[1] > 1:
        for p in params:
            dist.broadcast(p.data, src=0)


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (decisions taken on rank 0, e.g. early stopping on its validation score)."""
    if world()[1] == 1:
        return bool(flag)
    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(t, src=0)
    return bool(t.item())
