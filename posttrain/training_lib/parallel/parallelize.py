"""Apply the plan to a plain model, in torchtitan's order: activation checkpointing → compile →
FSDP2 (each decoder block, then the root). Checkpoint wrappers go on before compile so the
compiled region includes the recompute; FSDP goes last so its hooks wrap the compiled blocks
and every block's parameters are gathered just in time. (Tensor parallel, which would come
first, is not implemented yet.)"""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from posttrain.training_lib.models.loading import decoder_layers
from posttrain.training_lib.parallel.plan import Plan


def _apply_activation_checkpointing(layers: torch.nn.ModuleList) -> None:
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer)


def _apply_compile(layers: torch.nn.ModuleList) -> None:
    for layer in layers:
        layer.compile()


def _apply_fsdp(model: torch.nn.Module, layers: torch.nn.ModuleList, mesh: DeviceMesh, plan: Plan) -> None:
    mp = MixedPrecisionPolicy(param_dtype=plan.torch_param_dtype, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def parallelize(model: torch.nn.Module, plan: Plan, mesh: DeviceMesh) -> torch.nn.Module:
    layers = decoder_layers(getattr(model, "lm", model))
    if plan.activation_checkpointing:
        _apply_activation_checkpointing(layers)
    if plan.compile:
        _apply_compile(layers)
    if plan.strategy == "fsdp":
        _apply_fsdp(model, layers, mesh, plan)
        return model
    return DistributedDataParallel(model)
