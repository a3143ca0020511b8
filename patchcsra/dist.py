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
import time
import uuid
from datetime import timedelta
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
    rank_ = int(os.environ["RANK"])
    store = _round_store(rank_)
    if store is None:
        dist.init_process_group(backend=be)
    else:
        dist.init_process_group(backend=be, store=store, rank=rank_, world_size=int(os.environ["WORLD_SIZE"]))
    _logger.info("rank %d/%d joined (%s)", dist.get_rank(), dist.get_world_size(), be)
    return True


#: how long a rank waits for rank 0's store of this round (torch's default process-group timeout)
_ROUND_TIMEOUT = timedelta(minutes=30)


def _round_store(rank_: int, timeout: timedelta = _ROUND_TIMEOUT) -> Optional["dist.Store"]:
    """A key-value store that lives for this torchrun round only, hosted by rank 0; None outside torchrun.

    torchrun (``TORCHELASTIC_USE_AGENT_STORE``) hands every round of workers the agent's one TCPStore, and
    ``init_process_group`` keys gloo's addresses in it the same way each round. After ``--max-restarts`` the
    restarted ranks can read the dead ranks' addresses, so the new mesh times out ("Connection refused") or
    hangs for the 30-minute default (torch 2.14.1: 4 of 6 restarts of 2 processes failed so). Here rank 0
    starts a fresh store on a free port and publishes ``port nonce`` in the agent's store; the other ranks connect and keep
    only a store that holds that nonce, so a stale value (a dead port, or a reused one) is retried until
    rank 0 of this round has published. Every address the mesh exchanges is then this round's.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = dist.TCPStore(addr, port, is_master=False, timeout=timeout)
    key = f"patchcsra/round-store/{os.environ.get('TORCHELASTIC_RUN_ID', '')}"
    if rank_ == 0:
        nonce = uuid.uuid4().hex
        own = dist.TCPStore(addr, 0, world_size=None, is_master=True, timeout=timeout, wait_for_workers=False)
        own.set("patchcsra/nonce", nonce)
        agent.set(key, f"{own.port} {nonce}")
        return own
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        their_port, nonce = agent.get(key).decode().split()
        try:
            own = dist.TCPStore(addr, int(their_port), is_master=False, timeout=timedelta(seconds=5))
            if own.get("patchcsra/nonce").decode() == nonce:
                own.set_timeout(timeout)
                return own
        except (RuntimeError, ValueError):  # a dead rank 0's port (DistStoreError is a RuntimeError)
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {rank_}: rank 0 of this torchrun round published no store in "
                               f"{timeout.total_seconds():.0f} s (agent store {addr}:{port})")
        time.sleep(0.2)


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
