"""The plan: how a recipe runs on the hardware at hand. Decided once, from the recipe and the
devices, before the model is built; the recipe's explicit settings override `auto`.

Pure Python (no torch at import): `posttrain plan` and the DAG's first task call `choose_plan` and
`plan_problems` to refuse an impossible recipe before a cluster is started.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from posttrain.recipe import Recipe

if TYPE_CHECKING:
    from posttrain.training_lib.parallel.estimate import ModelShape


@dataclass(frozen=True)
class Plan:
    strategy: str  # "fsdp" | "ddp" | "fsdp_tp"
    device: str  # "cpu" | "cuda"
    param_dtype: str  # "float32" | "bfloat16"
    activation_checkpointing: bool
    compile: bool
    world_size: int
    tensor_parallel: int = 1

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.tensor_parallel

    @property
    def torch_param_dtype(self) -> Any:
        import torch

        return getattr(torch, self.param_dtype)

    def as_dict(self) -> dict:
        return {**asdict(self), "data_parallel": self.data_parallel}


def choose_plan(recipe: Recipe, world_size: int, device: str, bf16_capable: bool) -> Plan:
    """The decisions, as a pure function (`posttrain plan` calls it without torch or a GPU)."""
    t = recipe.training
    tp = t.tensor_parallel
    if t.sharding == "fsdp_tp" or tp > 1:
        strategy = "fsdp_tp"
    else:
        # FSDP2 even on one rank: the same code path at every scale, and a one-rank mesh costs nothing.
        strategy = "fsdp" if t.sharding in ("auto", "fsdp") else t.sharding
    if t.precision == "bf16" and not bf16_capable:
        raise ValueError(f"training.precision bf16 needs a GPU with bf16 support; this worker has {device}")
    precision = "bfloat16" if t.precision == "bf16" or (t.precision == "auto" and bf16_capable) else "float32"
    # Checkpointing trades compute for memory: worth it on accelerators, not for CPU-sized models.
    ac = t.activation_checkpointing if isinstance(t.activation_checkpointing, bool) else device == "cuda"
    return Plan(strategy=strategy, device=device, param_dtype=precision, activation_checkpointing=ac,
                compile=t.compile, world_size=world_size, tensor_parallel=tp)


def plan_problems(recipe: Recipe, plan: Plan, shape: ModelShape) -> list[tuple[str, str]]:
    """What makes the plan impossible for this model, as (recipe field, message with the numbers)."""
    tp = plan.tensor_parallel
    problems = []
    if plan.world_size % tp:
        problems.append(("training.tensor_parallel", f"tensor parallel degree {tp} does not divide the "
                         f"{plan.world_size} workers (compute.workers)"))
    for what, count in (("attention heads", shape.heads), ("key/value heads", shape.kv_heads),
                        ("MLP intermediate features", shape.intermediate)):
        if count % tp:
            problems.append(("training.tensor_parallel", f"tensor parallel degree {tp} does not divide the "
                             f"model's {count} {what}"))
    return problems


def make_plan(recipe: Recipe, world_size: int, device: str) -> Plan:
    """The plan for the devices this worker actually has."""
    import torch

    bf16 = device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return choose_plan(recipe, world_size, device, bf16)
