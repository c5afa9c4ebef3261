"""Checkpoints a resume needs: model and optimizer shards (torch.distributed.checkpoint), the step,
each rank's data position (the loader's or the streaming packer's) and RNG state.

A checkpoint is written into `step-NNNNNNNN.tmp/` and renamed to `step-NNNNNNNN/` by rank 0 after
every rank has finished, so a directory without the suffix is always complete: a crash mid-write
leaves only a `.tmp` that the next save or resume ignores.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))


def latest_checkpoint(root: Path) -> Path | None:
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


def save(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         loader_state: dict, rank: int, keep: int) -> Path:
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save({"loader": loader_state, "rng": _rng_state()}, tmp / f"rank-{rank:05d}.pt")
    dist.barrier()
    if rank == 0:
        (tmp / "train_state.json").write_text(json.dumps({"step": step, "world_size": dist.get_world_size()}))
        tmp.rename(final)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> tuple[int, dict]:
    """Restore in place; returns (step, this rank's data-loader state)."""
    meta = json.loads((path / "train_state.json").read_text())
    if meta["world_size"] != dist.get_world_size():
        raise RuntimeError(f"checkpoint {path} was written by {meta['world_size']} ranks, this run has "
                           f"{dist.get_world_size()}; resuming with a different data-parallel size is not "
                           "supported yet")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = torch.load(path / f"rank-{rank:05d}.pt", weights_only=False)
    _set_rng_state(extra["rng"])
    return meta["step"], extra["loader"]
