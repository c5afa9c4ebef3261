"""The plan and the memory estimate: how a recipe runs on the hardware at hand, and whether it fits.

Decided once, from the recipe and the devices, before the model is built; the recipe's explicit
settings override `auto`. Pure Python (no torch, no airflow): `posttrain plan`, the DAG's first task
(`check_plan` refuses an impossible recipe before a cluster is started) and the training job
(`training_lib.parallel.plan.make_plan`, with the devices it really has) all decide with it.

The memory figures are estimates of the big terms, meant to catch "this will not fit" before a
cluster is paid for, not to the megabyte:
- weights, gradients and AdamW moments, sharded over the data-parallel ranks by FSDP (whole on
  every rank for DDP); FSDP keeps float32 master weights and gathers one block at a time in the
  compute dtype (two in flight with prefetch);
- activations of one micro-batch (all layers, or one layer plus the block inputs when activation
  checkpointing recomputes the rest);
- one chunk of the chunked cross-entropy.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from posttrain import instance_types
from posttrain.model_shape import ModelShape, lora_params  # the shape lives there; callers import it from here too
from posttrain.recipe import Recipe, RecipeError
from posttrain.uris import model_file

GIB = 2**30
# Dense families with a tensor-parallel plan (training_lib.parallel.parallelize.TP_PLANS, which a
# test keeps equal to this): the plan check refuses the others before a cluster is started.
TENSOR_PARALLEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


def estimate(recipe: Recipe, shape: ModelShape, world: int, compute_bytes: int, activation_checkpointing: bool,
             strategy: str, tensor_parallel: int = 1) -> dict:
    t = recipe.training
    total = shape.params()
    trainable = lora_params(shape, recipe.model.lora.rank, recipe.model.lora.target_modules) \
        if recipe.model.lora else total
    tp = tensor_parallel
    dp = world // tp
    # float32 master weights (+ LoRA adapters), float32 grads and two AdamW moments for what trains.
    per_param = 4 * (total + (trainable if recipe.model.lora else 0)) + 4 * trainable + 8 * trainable
    if strategy == "ddp":
        states = per_param
    else:  # FSDP2 shards everything over dp; TP also splits the blocks' projections over tp
        block_share = shape.blocks_params() / total
        states = per_param * (block_share / world + (1 - block_share) / dp)
    gathered = 2 * shape.block_params() / tp * compute_bytes if strategy != "ddp" else 0
    tokens = t.micro_batch_size * recipe.data.max_seq_len
    # Per layer and token (Megatron's count without sequence parallel): ~10 hidden-sized tensors
    # replicated over the TP ranks, ~24 hidden-sized and 3 intermediate-sized ones split by TP.
    # A sparse block's MLP runs each token through its experts_per_token experts (mlp_width).
    per_layer = tokens * compute_bytes * (10 * shape.hidden + (24 * shape.hidden + 3 * shape.mlp_width()) / tp)
    activations = (shape.layers * tokens * shape.hidden * compute_bytes + per_layer) if activation_checkpointing \
        else shape.layers * per_layer
    loss_chunk = 2 * min(t.loss_chunk_tokens, tokens) * shape.vocab * 4
    parts = {"weights_grads_optimizer": states, "gathered_blocks": gathered, "activations": activations,
             "loss_chunk": loss_chunk}
    return {
        "params": total, "active_params": shape.active_params(), "trainable_params": trainable, "world_size": world,
        "strategy": strategy,
        "tensor_parallel": tp,
        "bytes": {k: int(v) for k, v in parts.items()},
        "gib": {k: round(v / GIB, 3) for k, v in parts.items()},
        "total_gib_per_device": round(sum(parts.values()) / GIB, 3),
    }


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
    if tp > 1 and shape.is_moe:
        return [("training.tensor_parallel", f"tensor parallel is not supported for MoE yet (model_type "
                 f"{shape.model_type}, {shape.experts} experts): use tensor_parallel: 1; FSDP shards the experts")]
    if tp > 1 and shape.model_type not in TENSOR_PARALLEL_TYPES:
        return [("training.tensor_parallel", f"no tensor-parallel plan for model_type {shape.model_type!r}; "
                 f"the families with one: {', '.join(TENSOR_PARALLEL_TYPES)}")]
    if plan.world_size % tp:
        problems.append(("training.tensor_parallel", f"tensor parallel degree {tp} does not divide the "
                         f"{plan.world_size} workers (compute.workers)"))
    for what, count in (("attention heads", shape.heads), ("key/value heads", shape.kv_heads),
                        ("MLP intermediate features", shape.intermediate)):
        if count % tp:
            problems.append(("training.tensor_parallel", f"tensor parallel degree {tp} does not divide the "
                             f"model's {count} {what}"))
    return problems


class ShapeUnknown(ValueError):
    """The model's shape can't be read on this side: what the plan check could not check, and why."""


def read_model_shape(recipe: Recipe, models: Callable[[str], Any] | None = None) -> ModelShape:
    """The model's shape from its config.json; raises ShapeUnknown saying why it can't be read.
    `models(uri)`: the filesystem reaching an s3:// model (an Airflow task's connection)."""
    base = recipe.model.base
    config = model_file(base, "config.json", models(base) if models and base.startswith("s3://") else None)
    if config is None:
        where = ("is not in the Hugging Face cache (nothing is downloaded)" if base.startswith("hf://")
                 else "could not be read here (no such object, or no credentials for the store on this "
                 "machine; the training job reads it on its nodes)" if base.startswith("s3://")
                 else "does not exist")
        raise ShapeUnknown(f"the config.json of model.base {base} {where}")
    try:
        data = json.loads(config.read_text())
        return ModelShape.from_config(data, recipe.model.pad_vocab_to_multiple_of)
    except json.JSONDecodeError as exc:
        raise ShapeUnknown(f"{config} is not JSON ({exc})") from None
    except (KeyError, TypeError, ValueError) as exc:
        kind = data.get("model_type") if isinstance(data, dict) else None
        raise ShapeUnknown(f"{config}: model_type {kind!r} is not an architecture the plan can read "
                           f"({type(exc).__name__}: {exc})") from None


def model_shape(recipe: Recipe) -> ModelShape | None:
    """The model's shape, or None where it can't be read (read_model_shape says why)."""
    try:
        return read_model_shape(recipe)
    except ShapeUnknown:
        return None


def memory_budget(recipe: Recipe) -> float | None:
    """Memory per device the plan must fit in: the recipe's, else on EC2 the worker type's GPU."""
    c = recipe.compute
    if c.memory_per_worker_gib is not None:
        return c.memory_per_worker_gib
    if c.ec2 is not None and c.gpus_per_worker:
        return instance_types.gpu_memory_gib(c.ec2.worker_instance_type)
    return None


def recipe_plan(recipe: Recipe, shape: ModelShape, device: str | None = None) -> Plan:
    """The plan as the job will choose it on `device` (default: a GPU when workers have GPUs,
    assumed bf16-capable, Ampere or newer; the job re-checks on the real device)."""
    device = device or ("cuda" if recipe.compute.gpus_per_worker else "cpu")
    return choose_plan(recipe, recipe.compute.workers, device, bf16_capable=device == "cuda", shape=shape,
                       memory_gib=memory_budget(recipe))


def plan_report(recipe: Recipe, shape: ModelShape, device: str | None = None, plan: Plan | None = None) -> dict:
    """The plan `posttrain plan` prints: strategy and precision, the model's shape, and the memory
    estimate per device (with the budget, if there is one)."""
    plan = plan or recipe_plan(recipe, shape, device)
    compute_bytes = 2 if plan.param_dtype == "bfloat16" else 4
    report = {
        **plan.as_dict(), "model": asdict(shape),
        **estimate(recipe, shape, recipe.compute.workers, compute_bytes, plan.activation_checkpointing,
                   plan.strategy, plan.tensor_parallel),
    }
    if (budget := memory_budget(recipe)) is not None:
        report["memory_per_worker_gib"] = budget
        report["fits"] = report["total_gib_per_device"] <= budget
    return report


def check_plan(recipe: Recipe, source: str = "<recipe>", models: Callable[[str], Any] | None = None) -> dict:
    """Refuse, before anything is submitted, a recipe the hardware can't run: a tensor-parallel
    degree that doesn't divide the heads or workers, or a memory estimate over the budget. Returns
    the plan report, or, when the model's config can't be read here, `{"checked": False, "reason":
    ...}`: the caller says so (the check is never skipped silently)."""
    try:
        shape = read_model_shape(recipe, models)
    except ShapeUnknown as exc:
        return {"checked": False, "reason": str(exc)}
    plan = recipe_plan(recipe, shape)
    report = plan_report(recipe, shape, plan=plan)
    problems = plan_problems(plan, shape)
    if report.get("fits") is False:
        problems.append(("compute.memory_per_worker_gib",
                         f"the plan needs about {report['total_gib_per_device']} GiB per worker, the budget is "
                         f"{report['memory_per_worker_gib']} GiB ({json.dumps(report['gib'])}); use more workers, "
                         "LoRA, activation checkpointing, a smaller micro_batch_size or max_seq_len"))
    if problems:
        raise RecipeError(source, problems)
    return {"checked": True, **report}
