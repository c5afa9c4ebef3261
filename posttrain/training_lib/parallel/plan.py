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
    checkpoint_every: int = 50  # steps between checkpoints; the newest `keep_checkpoints` are kept
    keep_checkpoints: int = 2
    reasons: tuple[str, ...] = ()  # why `auto` settings came out as they did

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.tensor_parallel

    @property
    def torch_param_dtype(self) -> Any:
        import torch

        return getattr(torch, self.param_dtype)

    def as_dict(self) -> dict:
        return {**asdict(self), "data_parallel": self.data_parallel}


def choose_plan(recipe: Recipe, world_size: int, device: str, bf16_capable: bool,
                shape: ModelShape | None = None, memory_gib: float | None = None) -> Plan:
    """The decisions, as a pure function (`posttrain plan` calls it without torch or a GPU).
    With the model's shape and the memory per device known, `activation_checkpointing: auto` is
    decided by the estimate: on only when the step would not fit without it."""
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
    reasons = []
    if isinstance(t.activation_checkpointing, bool):
        ac = t.activation_checkpointing
    elif shape is not None and memory_gib is not None:
        from posttrain.training_lib.parallel.estimate import estimate

        need = estimate(recipe, shape, world_size, 2 if precision == "bfloat16" else 4, False, strategy,
                        tp)["total_gib_per_device"]
        # 10% headroom: allocator fragmentation, the CUDA context, communication buffers.
        ac = need > 0.9 * memory_gib
        reasons.append(f"activation checkpointing {'on' if ac else 'off'}: about {need} GiB per device without "
                       f"it, {memory_gib:g} GiB available")
    else:
        # Checkpointing trades compute for memory: worth it on accelerators, not for CPU-sized models.
        ac = device == "cuda"
    return Plan(strategy=strategy, device=device, param_dtype=precision, activation_checkpointing=ac,
                compile=t.compile, world_size=world_size, tensor_parallel=tp,
                checkpoint_every=min(t.checkpoint_every, t.max_steps or t.checkpoint_every),
                keep_checkpoints=t.keep_checkpoints, reasons=tuple(reasons))


def plan_problems(plan: Plan, shape: ModelShape) -> list[tuple[str, str]]:
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
    """The plan for the devices this worker actually has: the recipe's memory budget, else the
    GPU's own memory (a CPU worker has no budget unless the recipe gives one)."""
    import torch

    from posttrain.training_lib.parallel.estimate import model_shape

    bf16 = device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    memory = recipe.compute.memory_per_worker_gib
    if memory is None and device == "cuda":
        memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
    return choose_plan(recipe, world_size, device, bf16, model_shape(recipe), memory)
