"""Loading the base model for training: Hugging Face weights, vocabulary padding, LoRA adapters."""

from __future__ import annotations

from typing import Any

import torch

from posttrain.recipe import Recipe, local_path


def model_location(uri: str) -> str:
    """What from_pretrained takes: a local folder for file:// (or plain paths), org/name for hf://."""
    if uri.startswith("hf://"):
        return uri.removeprefix("hf://")
    return str(local_path(uri))


def pad_vocab(model: torch.nn.Module, multiple: int) -> None:
    """Grow the embedding and output rows to a multiple of `multiple` (even shards, aligned matmuls).
    The new rows are never targets; evaluation restricts sampling to the tokenizer's ids."""
    size = model.get_input_embeddings().weight.shape[0]
    padded = -(-size // multiple) * multiple
    if padded != size:
        model.resize_token_embeddings(padded, mean_resizing=False)


def apply_lora(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = recipe.model.lora
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_for_training(recipe: Recipe, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    from posttrain.training_lib.models.attention import register

    model = AutoModelForCausalLM.from_pretrained(model_location(recipe.model.base), dtype=dtype,
                                                 attn_implementation=register())
    pad_vocab(model, recipe.model.pad_vocab_to_multiple_of)
    model.config.use_cache = False
    if recipe.model.lora is not None:
        model = apply_lora(model, recipe)
    return model


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The repeated transformer blocks (the unit of sharding and checkpointing)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model.layers
