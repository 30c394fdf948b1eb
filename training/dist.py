"""One process or ``torchrun``: rank and device, collectives that are no-ops alone, a resumable sharded sampler."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from digit_core.config import ConfigError


# -- distributed ---------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_dist(device: str = "auto") -> Dist:
    """One process, or the process group torchrun describes in its environment variables."""
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no CUDA GPU here; use device=auto or device=cpu")
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    dev = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    elif world > 1:  # ranks on one host share its cores; oversubscription makes all of them slow
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local, dev)


def all_gather(obj: Any) -> list[Any]:
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class ResumableSampler(DistributedSampler):
    """DistributedSampler that starts ``start`` samples into its epoch (a resume skips the
    batches already seen without loading them) and yields ``(index, seed)``: the per-sample
    augmentation seed depends on (run seed, epoch, index) only."""

    def __init__(self, dataset: Dataset, d: Dist, seed: int, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=d.world, rank=d.rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in list(super().__iter__())[self.start:]:
            yield i, (self.seed * 1_000_003 + self.epoch) * 10_000_019 + i
