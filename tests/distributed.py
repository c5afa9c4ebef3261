"""Run a function on N local processes joined in a gloo process group (no Ray): for tests of the
parallel model code itself. Each rank's return value comes back through a file."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def _worker(rank: int, fn: Callable, world: int, tmp: str, backend: str, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update({"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo", "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        Path(tmp, f"result-{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, tmp: Path, *args: Any, backend: str = "gloo") -> list[Any]:
    """fn(rank, world, *args) on `world` processes (fn must be importable: module level); with
    backend "nccl", rank r uses GPU r."""
    tmp = tmp.resolve()
    tmp.mkdir(parents=True, exist_ok=True)
    for stale in [tmp / "store", *tmp.glob("result-*.pkl")]:  # a file store left by an earlier run hangs gloo
        stale.unlink(missing_ok=True)
    mp.start_processes(_worker, args=(fn, world, str(tmp), backend, args), nprocs=world, join=True,
                       start_method="spawn")
    return [pickle.loads(Path(tmp, f"result-{r}.pkl").read_bytes()) for r in range(world)]
