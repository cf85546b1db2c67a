"""Data parallelism for generation under ``accelerate launch`` or ``torchrun``.

Each process generates a disjoint shard of the pending prompts and appends its
completions to its own cache file; after a barrier every process reads all
shards, so all of them hold every completion in input order. Only the main
process writes output files. With one process nothing here does anything.
"""

from __future__ import annotations

import datetime
import os


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def ensure_process_group() -> None:
    """Join the process group that the launcher set up, once (gloo on CPU, nccl on GPUs)."""
    import torch
    import torch.distributed as dist

    if world_size() == 1 or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))


def barrier() -> None:
    """Wait until every process arrives; a no-op with one process."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    ensure_process_group()
    dist.barrier()


def shard(items: list, size: int | None = None, index: int | None = None) -> list:
    """Return this process's share: every ``size``-th item starting at ``index``.

    Interleaving keeps the shards balanced when items are sorted by length.
    """
    size = world_size() if size is None else size
    index = rank() if index is None else index
    return items[index::size]
