"""Data parallelism over torch.distributed, launched by `torchrun --nproc_per_node=N train.py RECIPE`.

Every rank holds the frozen base model and the LoRA adapters, computes the same step's example list from
the sampler and takes its share (`indices[rank::world]`). Each rank divides its loss by the *whole* step's
answer-token count, which every rank knows without communication, so summing the ranks' gradients gives
the gradient of the whole batch's loss: one all-reduce of the LoRA gradients per optimizer step, none per
micro-batch (what DDP's `no_sync` achieves for accumulation). DDP's module wrapper is not used because
the loop calls the decoder and the head apart (to run the head on answer positions only), which bypasses
a wrapper's forward. Rank 0 alone writes logs, checkpoints and eval files and runs the evaluation (so its
scores, best checkpoint and early-stopping decision equal a one-process run's); the others wait.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Sequence

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init() -> torch.device:
    """Join the process group when launched by torchrun; return this rank's device."""
    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=60))
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def shard(indices: Sequence[int]) -> list[int]:
    return list(indices[rank()::world_size()])


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sum_scalar(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return value


def sum_grads(params: Sequence[torch.nn.Parameter]) -> None:
    """All-reduce (sum) the gradients of `params` in one flat buffer."""
    if not dist.is_initialized():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(reduced)


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's decision, for every rank."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.broadcast(t, 0)
    return bool(t.item())


def gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (on every rank)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
