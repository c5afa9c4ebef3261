"""The plan: how a recipe runs on the hardware at hand. Decided once, from the recipe and the
devices, before the model is built; the recipe's explicit settings override `auto`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from posttrain.recipe import Recipe


@dataclass(frozen=True)
class Plan:
    strategy: str  # "fsdp" | "ddp"
    device: str  # "cpu" | "cuda"
    param_dtype: str  # "float32" | "bfloat16"
    activation_checkpointing: bool
    compile: bool
    world_size: int

    @property
    def torch_param_dtype(self) -> Any:
        import torch

        return getattr(torch, self.param_dtype)

    def as_dict(self) -> dict:
        return asdict(self)


def choose_plan(recipe: Recipe, world_size: int, device: str, bf16_capable: bool) -> Plan:
    """The decisions, as a pure function (`posttrain plan` calls it without torch or a GPU)."""
    t = recipe.training
    strategy = "fsdp" if t.sharding in ("auto", "fsdp") else t.sharding
    if t.precision == "bf16" and not bf16_capable:
        raise ValueError(f"training.precision bf16 needs a GPU with bf16 support; this worker has {device}")
    precision = "bfloat16" if t.precision == "bf16" or (t.precision == "auto" and bf16_capable) else "float32"
    # Checkpointing trades compute for memory: worth it on accelerators, not for CPU-sized models.
    ac = t.activation_checkpointing if isinstance(t.activation_checkpointing, bool) else device == "cuda"
    return Plan(strategy=strategy, device=device, param_dtype=precision, activation_checkpointing=ac,
                compile=t.compile, world_size=world_size)


def make_plan(recipe: Recipe, world_size: int, device: str) -> Plan:
    """The plan for the devices this worker actually has."""
    import torch

    bf16 = device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return choose_plan(recipe, world_size, device, bf16)
