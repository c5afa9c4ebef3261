"""Checkpoints a resume needs: model and optimizer shards (torch.distributed.checkpoint), the step,
each rank's data position (the loader's or the streaming packer's) and RNG state, in a local folder
or an object store (s3://) alike.

Object stores have no rename, so completeness is not a folder name: every rank writes its DCP shards
and its own state into `step-NNNNNNNN/`, and after all of them have finished rank 0 writes the commit
marker `commit.json` (the step, the world size, every file with its size) last. Only a folder with
its marker is a checkpoint: a job killed mid-write leaves one without, which resume never picks and
a later save of that step (or pruning, once a newer one is complete) clears.
"""

from __future__ import annotations

import io
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import (  # not re-exported by the package in 2.13
    FileSystem,
    FsspecReader,
    FsspecWriter,
)
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from posttrain.storage_fs import COMMIT, Store, is_local, storage_options

_STEP_DIR = re.compile(r"^step-(\d{8})(\.tmp)?$")  # .tmp: left by the rename-based layout before this one

Location = str | Path | Store


def _store(root: Location) -> Store:
    return root if isinstance(root, Store) else Store.at(root)


def _steps(root: Store) -> list[tuple[int, Store]]:
    """Every step folder under root, complete or not, oldest first."""
    found = [(int(m.group(1)), root / name) for name in root.listdir() if (m := _STEP_DIR.match(name))]
    return sorted(found, key=lambda item: (item[0], item[1].name))


def is_complete(path: Location) -> bool:
    return (_store(path) / COMMIT).exists()


def complete_checkpoints(root: Location) -> list[Store]:
    return [path for _, path in _steps(_store(root)) if not path.name.endswith(".tmp") and is_complete(path)]


def latest_checkpoint(root: Location) -> Store | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _writer(path: Store) -> FsspecWriter:
    # fsync suits a local disk; an object is durable once its upload completes (and DCP's fallback
    # for a stream without a file descriptor is os.sync(), which flushes the whole machine).
    return FsspecWriter(path.uri, sync_files=is_local(path.uri), **storage_options(path.uri))


# Reading from an object store: torch.load seeks back and forth inside each tensor's record, and
# s3fs's default readahead cache refetches (with 50 MiB of readahead) on every backward seek. An LRU
# of large blocks turns that into few, large range reads (benchmarks/checkpoint_io.py: ~4x on moto),
# and bounds a reader's memory to READ_BLOCKS x READ_BLOCK_BYTES per open file.
READ_BLOCK_BYTES = 32 * 2**20
READ_BLOCKS = 4


class _BlockCachedFileSystem(FileSystem):
    @contextmanager
    def create_stream(self, path: str | Path, mode: str) -> Iterator[IO[Any]]:
        if "r" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with self.fs.open(str(path), mode, cache_type="blockcache", block_size=READ_BLOCK_BYTES,
                          cache_options={"maxblocks": READ_BLOCKS}) as stream:
            yield stream


def _reader(path: Store) -> FsspecReader:
    reader = FsspecReader(path.uri, **storage_options(path.uri))
    if not is_local(path.uri):
        cached = _BlockCachedFileSystem()
        cached.fs = reader.fs.fs
        reader.fs = cached
    return reader


def save(root: Location, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         loader_state: dict, rank: int, keep: int) -> Store:
    """Collective: write the checkpoint of `step`, commit it, and keep the `keep` newest complete ones."""
    root = _store(root)
    target = root / f"step-{step:08d}"
    if rank == 0:
        target.remove()  # what a job killed while writing this step left (shards of another world size, too)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=_writer(target))
    buffer = io.BytesIO()
    torch.save({"loader": loader_state, "rng": _rng_state()}, buffer)
    (target / f"rank-{rank:05d}.pt").write_bytes(buffer.getvalue())
    dist.barrier()
    if rank == 0:
        files = target.sizes()
        (target / COMMIT).write_json({"step": step, "world_size": dist.get_world_size(), "files": files})
        prune(root, keep, writing=step)
    dist.barrier()
    return target


def prune(root: Location, keep: int, writing: int) -> list[str]:
    """Remove all but the `keep` newest complete checkpoints, and the incomplete folders older than
    the newest complete one (left by killed jobs). The step being written (`writing`) and anything
    newer are never touched. Returns the names removed."""
    steps = _steps(_store(root))
    complete = [(s, p) for s, p in steps if not p.name.endswith(".tmp") and is_complete(p)]
    kept = {p.name for _, p in complete[-keep:]} if keep > 0 else {p.name for _, p in complete}
    newest = complete[-1][0] if complete else -1
    removed = []
    for s, path in steps:
        if s >= writing or path.name in kept or s > newest:
            continue
        path.remove()
        removed.append(path.name)
    return removed


def load(path: Location, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> tuple[int, dict]:
    """Restore in place; returns (step, this rank's data-loader state)."""
    path = _store(path)
    meta = (path / COMMIT).read_json()
    if meta["world_size"] != dist.get_world_size():
        raise RuntimeError(f"checkpoint {path} was written by {meta['world_size']} ranks, this run has "
                           f"{dist.get_world_size()}; resuming with a different data-parallel size is not "
                           "supported yet")
    present = path.sizes()
    damaged = sorted(name for name, size in meta["files"].items() if present.get(name) != size)
    if damaged:
        raise RuntimeError(f"checkpoint {path}: {len(damaged)} of the files its {COMMIT} names are missing or "
                           f"changed since it was committed ({', '.join(damaged[:5])}); remove it to resume from "
                           "the one before")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, storage_reader=_reader(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = torch.load(io.BytesIO((path / f"rank-{rank:05d}.pt").read_bytes()), weights_only=False)
    _set_rng_state(extra["rng"])
    return meta["step"], extra["loader"]
