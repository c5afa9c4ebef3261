"""Packed blocks from the prepared Parquet shards, split across data-parallel ranks.

Every rank sees the same number of batches per epoch (the epoch's order is trimmed to a multiple
of world_size × micro_batch_size × grad_accum, wrapping around when the data is smaller than that),
because an uneven count would leave one rank waiting in a collective forever, and an epoch is a
whole number of optimizer steps, so `training.epochs` means what it says (`steps_for`). The
position (epoch, batch) is all a resume needs: the order of an epoch is a pure function of (seed,
epoch).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch

from posttrain.recipe import Recipe
from posttrain.storage_fs import Store, workspace_store
from posttrain.training_lib.data.streaming import StreamingLoader, StreamingPacker
from posttrain.training_lib.seeding import derive_seed


def read_manifest(workspace: Store | Path) -> dict:
    """data/manifest.json: the splits' shards and stats, and the tokenizer the data was prepared with
    (from the workspace's folder or object store)."""
    return (workspace_store(workspace) / "data" / "manifest.json").read_json()


def split_tables(workspace: Store | Path, split: str) -> list:
    store = workspace_store(workspace)
    tables = []
    for shard in read_manifest(workspace)["splits"][split]["shards"]:
        with (store / shard).open("rb") as fh:  # one shard's bytes at a time, straight from the store
            tables.append(pq.read_table(fh))
    return tables


def read_prompts(workspace: Store | Path, split: str) -> list[dict]:
    """The prompt layout (RL): token ids with the generation prompt, the messages, the reference answer."""
    prompts = [{"ids": r["prompt_input_ids"], "messages": json.loads(r["prompt"]), "answer": r["answer"]}
               for t in split_tables(workspace, split) for r in t.to_pylist()]
    if not prompts:
        raise ValueError(f"{workspace / 'data'}: the prepared {split} split holds no prompts")
    return prompts


def read_documents(workspace: Store | Path, split: str) -> tuple[list[list[int]], list[list[bool]]]:
    """Tokenized, unpacked documents (the streaming layout): ids and which tokens train."""
    tables = split_tables(workspace, split)
    return ([r for t in tables for r in t.column("input_ids").to_pylist()],
            [r for t in tables for r in t.column("assistant_mask").to_pylist()])


def read_blocks(workspace: Store | Path, split: str) -> dict[str, torch.Tensor]:
    tables = split_tables(workspace, split)
    out = {}
    for column in ("input_ids", "labels", "position_ids"):
        rows = [row for t in tables for row in t.column(column).to_pylist()]
        out[column] = torch.tensor(rows, dtype=torch.long)
    return out


@dataclass
class LoaderState:
    epoch: int = 0
    batch: int = 0  # batches of this epoch already consumed by this rank


class PackedLoader:
    def __init__(self, blocks: dict[str, torch.Tensor], rank: int, world_size: int, micro_batch_size: int,
                 seed: int, state: LoaderState | None = None, grad_accum: int = 1):
        self.blocks = blocks
        self.rank, self.world_size, self.mbs, self.seed = rank, world_size, micro_batch_size, seed
        self.state = state or LoaderState()
        self.num_blocks = blocks["input_ids"].shape[0]
        if self.num_blocks == 0:
            raise ValueError("the prepared split holds no blocks")
        # Micro-batches per rank and epoch: whole optimizer steps of every rank.
        self.batches_per_epoch = grad_accum * max(1, self.num_blocks // (world_size * micro_batch_size * grad_accum))

    @functools.lru_cache(maxsize=1)  # noqa: B019 - one epoch's order, reused by all its batches
    def _epoch_indices(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        order = torch.randperm(self.num_blocks, generator=g)
        need = self.batches_per_epoch * self.world_size * self.mbs
        if need > self.num_blocks:
            order = order.repeat(-(-need // self.num_blocks))
        mine = order[:need].view(self.batches_per_epoch, self.world_size, self.mbs)[:, self.rank]
        return mine

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.state.epoch, "batch": self.state.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.state = LoaderState(**state)

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.state.batch >= self.batches_per_epoch:
            self.state = LoaderState(epoch=self.state.epoch + 1, batch=0)
        idx = self._epoch_indices(self.state.epoch)[self.state.batch]
        self.state.batch += 1
        return {k: v[idx] for k, v in self.blocks.items()}


def steps_for(recipe: Recipe, blocks_per_epoch: int, dp_size: int) -> int:
    """Optimizer steps of the run: `training.max_steps`, or `training.epochs` epochs, an epoch being
    every block once over all data-parallel ranks and a step micro_batch_size × grad_accum blocks
    on each of the `dp_size` ranks (the blocks an epoch's last, partial step would take are left
    out, as PackedLoader leaves them out; with streaming packing the epoch's block count is the
    offline packing's, so its epochs are approximate)."""
    t = recipe.training
    if t.max_steps:
        return t.max_steps
    return t.epochs * max(1, blocks_per_epoch // (t.micro_batch_size * t.grad_accum * dp_size))


def make_loader(recipe: Recipe, workspace: Store | Path, rank: int,
                world: int) -> tuple[PackedLoader | StreamingLoader, int]:
    """This rank's micro-batches of the prepared train split: offline-packed blocks, or blocks packed
    on the fly from the document stream. Returns (loader, blocks per epoch over all ranks)."""
    t, packing = recipe.training, recipe.data.packing
    manifest = read_manifest(workspace)
    if packing.mode == "streaming":
        ids, trains = read_documents(workspace, "train")
        packer = StreamingPacker(ids, trains, recipe.data.max_seq_len, manifest["tokenizer"]["block_pad_id"],
                                 t.seed, rank, world, packing.buffer_docs)
        return StreamingLoader(packer, t.micro_batch_size), manifest["splits"]["train"]["blocks"]
    loader = PackedLoader(read_blocks(workspace, "train"), rank, world, t.micro_batch_size, t.seed,
                          grad_accum=t.grad_accum)
    return loader, loader.num_blocks
