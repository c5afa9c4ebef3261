"""The plan for the devices this worker really has. What the plan holds and how it is decided is
torch-free and lives in posttrain.planning (the DAG's first task decides with it too); here the
job adds what only a worker can know: its GPU's bf16 support and memory."""

from __future__ import annotations

import torch

from posttrain.planning import Plan, choose_plan, model_shape
from posttrain.recipe import Recipe


def make_plan(recipe: Recipe, world_size: int, device: str) -> Plan:
    """The plan for the devices this worker actually has: the recipe's memory budget, else the
    GPU's own memory (a CPU worker has no budget unless the recipe gives one)."""
    bf16 = device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    memory = recipe.compute.memory_per_worker_gib
    if memory is None and device == "cuda":
        memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    return choose_plan(recipe, world_size, device, bf16, model_shape(recipe), memory)


def param_dtype(plan: Plan) -> torch.dtype:
    """The plan's compute dtype as torch names it."""
    return getattr(torch, plan.param_dtype)
