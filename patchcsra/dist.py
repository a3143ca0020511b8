"""torch.distributed helpers for ``torchrun`` runs (NCCL on GPU, gloo on CPU).

* :func:`init_from_env` -- join the process group that ``torchrun`` describes in the environment
  (``WORLD_SIZE``/``RANK``/``MASTER_ADDR``...); a no-op for a single process.
* :func:`rank`, :func:`world_size`, :func:`is_main` -- where this process stands.
* :func:`shard` -- this rank's indices of ``range(n)`` (strided: every index on exactly one rank).
* :func:`gather_to_main` -- Python objects from every rank, on rank 0 (``None`` elsewhere).
* :func:`broadcast` -- an object from rank 0 to every rank.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ["init_from_env", "rank", "world_size", "is_main", "shard", "gather_to_main", "broadcast", "barrier",
           "local_device"]

_logger = logging.getLogger(__name__)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_from_env(backend: Optional[str] = None) -> bool:
    """Initialise the default process group from ``torchrun``'s environment; True when distributed."""
    if _active():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    be = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if be == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=be)
    _logger.info("rank %d/%d joined (%s)", dist.get_rank(), dist.get_world_size(), be)
    return True


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    return rank() == 0


def local_device() -> Optional[str]:
    """``cuda:<LOCAL_RANK>`` under a CUDA torchrun, else None (let the caller decide)."""
    if _active() and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return None


def shard(n: int) -> list[int]:
    """Indices of ``range(n)`` for this rank: ``rank, rank + W, ...`` (no index twice, none left out)."""
    return list(range(rank(), n, world_size()))


def gather_to_main(obj: Any) -> Optional[list[Any]]:
    """Every rank's ``obj`` as a list indexed by rank, on rank 0; ``None`` on the other ranks."""
    if world_size() == 1:
        return [obj]
    out: Optional[list[Any]] = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
