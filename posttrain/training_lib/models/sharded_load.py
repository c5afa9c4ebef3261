"""Each rank reads only its own shard of the base model from the safetensors files.

The model is built on the meta device (parameters without storage), parallelized (tensor parallel
and FSDP2 turn every parameter into a DTensor whose local shape is this rank's shard), then
`materialize` allocates the local shards only (`to_empty`) and fills them with slices read straight
from the files (`safe_open(...).get_slice` reads just the requested rows/columns). No rank ever
holds the whole model. Parameters the checkpoint does not have (LoRA adapters, vocabulary padding
rows) are initialised from the seed and the parameter's name, so every rank and every world size
gets the same values.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from posttrain.training_lib.seeding import derive_seed

# Prefixes and infixes that wrappers add to parameter names; none of them is in the HF checkpoint.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


class ShardLoadError(RuntimeError):
    pass


@dataclass
class LoadReport:
    """What one rank did: the bytes it read from the files and holds, against the model's size."""
    tensors_read: int = 0
    bytes_read: int = 0
    local_bytes: int = 0
    full_bytes: int = 0
    initialized: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"tensors_read": self.tensors_read, "bytes_read": self.bytes_read, "local_bytes": self.local_bytes,
                "full_bytes": self.full_bytes, "initialized": len(self.initialized)}


def checkpoint_name(param_name: str) -> str:
    """The HF checkpoint key of a (wrapped) model's parameter: drop our loss wrapper's `lm.`, PEFT's
    `base_model.model.` and `.base_layer`, and the checkpoint/compile/FSDP wrapper infixes."""
    name = param_name.removeprefix("lm.")
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def safetensors_index(model_dir: Path) -> dict[str, Path]:
    """Checkpoint key → the file holding it (single file or sharded with an index)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: model_dir / v for k, v in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.exists():
        raise ShardLoadError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    with safe_open(str(single), framework="pt") as fh:
        return {k: single for k in fh.keys()}


def local_region(param: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(this rank's local tensor, its shape, its offset in the global tensor)."""
    if isinstance(param, DTensor):
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        return param.to_local(), tuple(shape), tuple(offset)
    return param, tuple(param.shape), (0,) * param.dim()


def shard_index(offset: tuple[int, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The index of a local shard in its global tensor."""
    return tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))


def _seeded_init(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Full initial value of a parameter the checkpoint lacks: LoRA B zeros (the adapter starts as a
    no-op), LoRA A as nn.Linear initialises (kaiming-uniform, a=√5). Small tensors only."""
    if ".lora_B." in name or "lora_embedding_B" in name:
        return torch.zeros(shape)
    if ".lora_A." in name or "lora_embedding_A" in name:
        gen = torch.Generator().manual_seed(derive_seed(seed, zlib.crc32(name.encode())))
        bound = 1.0 / math.sqrt(shape[-1])
        return (torch.rand(shape, generator=gen) * 2 - 1) * bound
    raise ShardLoadError(f"parameter {name!r} is neither in the checkpoint nor an adapter; "
                         "the checkpoint does not match the model config")


def load_shards(model: torch.nn.Module, model_dir: Path, seed: int,
                initial: Mapping[str, torch.Tensor] | None = None) -> LoadReport:
    """Fill every parameter's local shard in place from the checkpoint (after `to_empty`).
    `initial`: full values of parameters outside the checkpoint by name (a custom head's)."""
    index = safetensors_index(model_dir)
    initial = initial or {}
    report = LoadReport()
    with torch.no_grad():
        for name, param in model.named_parameters():
            local, shape, offset = local_region(param)
            report.local_bytes += local.numel() * local.element_size()
            report.full_bytes += param.numel() * param.element_size()
            if local.numel() == 0:
                continue
            key = checkpoint_name(name)
            if key in initial:
                local.copy_(initial[key][shard_index(offset, shape)])
                report.initialized.append(key)
                continue
            if key == "lm_head.weight" and key not in index:  # tied: stored once, as the embedding
                key = "model.embed_tokens.weight"
            if key not in index and (experts := expert_keys(key, index)) is not None:
                report.bytes_read += _copy_experts(local, experts, index, offset, shape)
                report.tensors_read += 1
                continue
            if key not in index:
                local.copy_(_seeded_init(key, tuple(param.shape), seed)[shard_index(offset, shape)])
                report.initialized.append(key)
                continue
            # One open per tensor: the file is memory-mapped, and a mapping kept open for the whole
            # load keeps every page read so far resident (the shard plus the file pages behind it).
            with safe_open(str(index[key]), framework="pt") as fh:
                _copy_region(local, fh.get_slice(key), key, tuple(param.shape), offset, shape, report)
            report.tensors_read += 1
    return report


def expert_keys(key: str, index: dict[str, Path]) -> list[list[str]] | None:
    """The checkpoint keys a fused expert parameter is made of, per expert, or None if `key` isn't one.
    transformers 5 holds a sparse block's experts as 3-D parameters (`mlp.experts.gate_up_proj`
    [experts, 2 × intermediate, hidden], gate rows first; `mlp.experts.down_proj`) and writes
    checkpoints as the released ones are, one 2-D weight per expert and projection."""
    prefix, _, kind = key.rpartition(".")
    if not prefix.endswith(".experts") or kind not in ("gate_up_proj", "down_proj"):
        return None
    parts = ["gate_proj", "up_proj"] if kind == "gate_up_proj" else ["down_proj"]
    experts = []
    while all(f"{prefix}.{len(experts)}.{part}.weight" in index for part in parts):
        experts.append([f"{prefix}.{len(experts)}.{part}.weight" for part in parts])
    return experts or None


def _copy_experts(local: torch.Tensor, experts: list[list[str]], index: dict[str, Path], offset: tuple[int, ...],
                  shape: tuple[int, ...]) -> int:
    """Fill this rank's experts (FSDP shards dim 0, the experts) from their per-expert weights; only
    the rank's own experts are read. Returns the bytes read."""
    if offset[0] + shape[0] > len(experts):
        raise ShardLoadError(f"{experts[0][0]}: the checkpoint has {len(experts)} experts, the model more")
    read = 0
    for i, e in enumerate(range(offset[0], offset[0] + shape[0])):
        parts = []
        for name in experts[e]:
            with safe_open(str(index[name]), framework="pt") as fh:
                parts.append(fh.get_tensor(name))
        weight = torch.cat(parts, dim=0)
        region = tuple(slice(o, o + n) for o, n in zip(offset[1:], shape[1:], strict=True))
        local[i].copy_(weight[region])
        read += sum(t.numel() * t.element_size() for t in parts)
    return read


def _copy_region(local: torch.Tensor, stored: object, key: str, full_shape: tuple[int, ...],
                 offset: tuple[int, ...], shape: tuple[int, ...], report: LoadReport) -> None:
    """Read the overlap of this rank's region with the stored tensor; rows past the stored ones
    (the vocabulary padded to a multiple) start at zero."""
    stored_shape = tuple(stored.get_shape())
    if stored_shape[1:] != full_shape[1:] or stored_shape[0] > full_shape[0]:
        raise ShardLoadError(f"{key}: checkpoint shape {list(stored_shape)} does not fit the model's "
                             f"{list(full_shape)}")
    local.zero_()
    rows = min(offset[0] + shape[0], stored_shape[0]) - offset[0]
    if rows <= 0:
        return
    read = (slice(offset[0], offset[0] + rows),) + tuple(slice(o, o + n) for o, n in zip(offset[1:], shape[1:],
                                                                                       strict=True))
    values = stored[read]
    local[:rows].copy_(values)
    report.bytes_read += values.numel() * values.element_size()


def materialize(model: torch.nn.Module, device: str, model_dir: Path, seed: int,
                initial: Mapping[str, torch.Tensor] | None = None) -> LoadReport:
    """Allocate this rank's shards on `device` and load them (`initial`: see load_shards). Buffers
    (rotary frequencies) were built for real on the CPU and survive `to_empty`, which would
    otherwise leave them garbage."""
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.copy_(buffers[name])
    report = load_shards(model, model_dir, seed, initial)
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise ShardLoadError(f"still on the meta device after loading: {left[:5]}")
    return report
