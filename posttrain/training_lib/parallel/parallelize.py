"""Apply the plan to a plain model, in torchtitan's order: tensor parallel → activation
checkpointing → compile → FSDP2 (each decoder block, then the root).

TP goes first because it rewrites the linear layers' parameters into DTensors sharded over the
`tp` mesh dimension; checkpoint wrappers go on before compile so the compiled region includes the
recompute; FSDP goes last so its hooks wrap the compiled blocks, shard what TP left over the `dp`
dimension, and gather every block's parameters just in time.

`build_parallel_model` does it on the meta device and then lets each rank load only its shard.
"""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn.parallel import DistributedDataParallel

from posttrain.planning import Plan
from posttrain.recipe import Recipe
from posttrain.training_lib.models.components import meta_head
from posttrain.training_lib.models.loading import build_on_meta, decoder_layers, model_dir
from posttrain.training_lib.models.sharded_load import LoadReport, materialize
from posttrain.training_lib.models.with_loss import CausalLMWithLoss, base_model
from posttrain.training_lib.parallel.plan import param_dtype

# Megatron-style split of a Llama block: column-parallel into the heads / MLP features, row-parallel
# back out (one all-reduce per attention and per MLP). Inputs and outputs of the block stay
# replicated, so norms, embeddings and the output projection are untouched by TP. The attention
# reshapes its projections to (-1 heads, head_dim), so each rank just sees fewer heads.
LLAMA_TP_PLAN = {
    "self_attn.q_proj": ColwiseParallel, "self_attn.k_proj": ColwiseParallel, "self_attn.v_proj": ColwiseParallel,
    "self_attn.o_proj": RowwiseParallel,
    "mlp.gate_proj": ColwiseParallel, "mlp.up_proj": ColwiseParallel, "mlp.down_proj": RowwiseParallel,
}
# The plan of each dense family, by config.json's model_type (posttrain.planning.TENSOR_PARALLEL_TYPES
# lists the same, so the plan check refuses the others before a cluster starts; MoE is refused there).
TP_PLANS = {
    "llama": LLAMA_TP_PLAN,
    # Mistral: Llama's block with other defaults (GQA, optional sliding window: a mask, not weights).
    "mistral": LLAMA_TP_PLAN,
    # Qwen2: q/k/v carry biases, which ColwiseParallel shards with their rows.
    "qwen2": LLAMA_TP_PLAN,
    # Qwen3: q_norm/k_norm normalise each head over head_dim after the reshape, with one head_dim
    # weight shared by all heads: a rank holding some of the heads applies it to them unchanged.
    "qwen3": LLAMA_TP_PLAN,
    # Gemma 3: the same q/k norms; its extra norms (pre/post feed-forward) act on the replicated
    # hidden state, and the tied embedding/output are outside the blocks, so none of them is split.
    "gemma3_text": LLAMA_TP_PLAN,
}


def make_mesh(plan: Plan, device: str) -> DeviceMesh:
    """("dp", "tp") mesh; tp is the inner dimension so a TP group is neighbouring ranks (one node)."""
    return init_device_mesh(device, (plan.data_parallel, plan.tensor_parallel), mesh_dim_names=("dp", "tp"))


def tp_plan(model_type: str) -> dict[str, type]:
    if model_type not in TP_PLANS:
        raise ValueError(f"no tensor-parallel plan for model_type {model_type!r}; the families with one: "
                         + ", ".join(TP_PLANS))
    return TP_PLANS[model_type]


def _apply_tp(model: torch.nn.Module, layers: torch.nn.ModuleList, tp_mesh: DeviceMesh) -> None:
    plan = tp_plan(base_model(getattr(model, "lm", model)).config.model_type)
    for layer in layers:
        parallelize_module(layer, tp_mesh, {name: style() for name, style in plan.items()})


def _apply_activation_checkpointing(layers: torch.nn.ModuleList) -> None:
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer)


def _apply_compile(layers: torch.nn.ModuleList) -> None:
    for layer in layers:
        layer.compile()


def _apply_fsdp(model: torch.nn.Module, layers: torch.nn.ModuleList, dp_mesh: DeviceMesh, plan: Plan) -> None:
    mp = MixedPrecisionPolicy(param_dtype=param_dtype(plan), reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)


def parallelize(model: torch.nn.Module, plan: Plan, mesh: DeviceMesh) -> torch.nn.Module:
    layers = decoder_layers(getattr(model, "lm", model))
    if plan.tensor_parallel > 1:
        _apply_tp(model, layers, mesh["tp"])
    if plan.activation_checkpointing:
        _apply_activation_checkpointing(layers)
    if plan.compile:
        _apply_compile(layers)
    if plan.strategy in ("fsdp", "fsdp_tp"):
        _apply_fsdp(model, layers, mesh["dp"], plan)
        return model
    return DistributedDataParallel(model)


def build_parallel_model(recipe: Recipe, plan: Plan, mesh: DeviceMesh) -> tuple[torch.nn.Module, LoadReport]:
    """The training model: built on the meta device, parallelized, then each rank allocates and
    reads only its own shards. DDP replicates, so every rank loads everything there."""
    # Compiled blocks get transformers' SDPA with the packed-document mask built once per batch
    # outside the blocks: our per-document attention splits on the data (a graph break), and a
    # break inside a checkpointed block makes dynamo give up on the whole block.
    attention = "sdpa" if plan.compile else None
    lm = build_on_meta(recipe, attention=attention)
    # A recipe's head (model.components.head) is part of the root: FSDP2 shards it with the embedding
    # and output layer, each rank fills its shard from the head's seeded initial values.
    head, initial = meta_head(recipe, base_model(lm).config)
    model = CausalLMWithLoss(lm, recipe.training.loss_chunk_tokens, head=head)
    if plan.strategy == "ddp":
        report = materialize(model, plan.device, model_dir(recipe.model.base), recipe.training.seed, initial)
        return parallelize(model, plan, mesh), report
    model = parallelize(model, plan, mesh)
    return model, materialize(model, plan.device, model_dir(recipe.model.base), recipe.training.seed, initial)


def build_frozen_model(recipe: Recipe, plan: Plan, mesh: DeviceMesh, base: str) -> tuple[torch.nn.Module, LoadReport]:
    """A frozen model on the job's mesh (the KD teacher, `base` a model location): the decoder blocks
    tensor-parallel and FSDP-sharded like the student's, the embedding and output layer replicated,
    so the distillation loss can read the output weights outside the teacher's forward (a sharded
    root would have freed its gathered copy). No LoRA, checkpointing or compile: nothing runs
    backward through it."""
    frozen = recipe.model_copy(update={"model": recipe.model.model_copy(update={"base": base, "lora": None})})
    model = CausalLMWithLoss(build_on_meta(frozen), recipe.training.loss_chunk_tokens)
    layers = decoder_layers(model.lm)
    if plan.tensor_parallel > 1:
        _apply_tp(model, layers, mesh["tp"])
    if plan.strategy in ("fsdp", "fsdp_tp"):
        mp = MixedPrecisionPolicy(param_dtype=param_dtype(plan), reduce_dtype=torch.float32)
        for layer in layers:
            fully_shard(layer, mesh=mesh["dp"], mp_policy=mp)
    report = materialize(model, plan.device, model_dir(base), recipe.training.seed)
    model.requires_grad_(False)
    return model.eval(), report
