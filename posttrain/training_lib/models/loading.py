"""Loading the base model: Hugging Face weights, vocabulary padding, LoRA adapters.

Training builds the model on the meta device (`build_on_meta`) and each rank loads only its shard
after parallelizing (see sharded_load.py); `load_for_training` loads the whole model in one process
(the reference the logit verifier compares against, and single-process tools).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from posttrain.recipe import Recipe
from posttrain.training_lib.models.attention import register
from posttrain.uris import model_dir, model_location  # noqa: F401 (model_dir: re-exported)


def pad_vocab(model: torch.nn.Module, multiple: int) -> None:
    """Grow the embedding and output rows to a multiple of `multiple` (even shards, aligned matmuls).
    The new rows are never targets, and never enter a softmax: the config keeps the checkpoint's
    size as `unpadded_vocab_size`, CausalLMWithLoss computes every loss and log-prob over those rows
    only, and the export drops them again (unpad_vocab). They start
    at zero, as the sharded load fills them (resize_token_embeddings would draw them at random), so
    the padded model is the same whichever way it was loaded."""
    size = model.get_input_embeddings().weight.shape[0]
    padded = -(-size // multiple) * multiple
    if padded != size:
        model.config.unpadded_vocab_size = size  # the rows no softmax may see (CausalLMWithLoss)
        model.resize_token_embeddings(padded, mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight[size:].zero_()
            output = model.get_output_embeddings()
            if output is not None:
                output.weight[size:].zero_()


def unpad_vocab(model: torch.nn.Module) -> None:
    """Drop the rows pad_vocab added (the export has the checkpoint's shapes: what vLLM, the GRPO
    engine and other tools load never holds a padding row)."""
    real = getattr(model.config, "unpadded_vocab_size", None)
    if real is not None:
        model.resize_token_embeddings(real, mean_resizing=False)
        delattr(model.config, "unpadded_vocab_size")


def apply_lora(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    lora = recipe.model.lora
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_for_eval(location: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """A saved model as the evaluation scores it: our per-document attention, eval mode."""
    return AutoModelForCausalLM.from_pretrained(location, dtype=dtype, attn_implementation=register()).eval()


def load_for_training(recipe: Recipe, dtype: torch.dtype = torch.float32) -> Any:
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


def padded_config(recipe: Recipe, attention: str | None = None) -> Any:
    """The base model's config with the vocabulary padded to the recipe's multiple, and the
    attention backend (default: ours, per-document SDPA)."""
    config = AutoConfig.from_pretrained(model_location(recipe.model.base))
    multiple = recipe.model.pad_vocab_to_multiple_of
    padded = -(-config.vocab_size // multiple) * multiple
    if padded != config.vocab_size:
        config.unpadded_vocab_size = getattr(config, "unpadded_vocab_size", config.vocab_size)
        config.vocab_size = padded
    config.use_cache = False
    config._attn_implementation = attention or register()
    return config


def build_on_meta(recipe: Recipe, dtype: torch.dtype = torch.float32, attention: str | None = None) -> torch.nn.Module:
    """The model (with LoRA adapters if the recipe has them) with every parameter on the meta
    device: no memory until each rank materializes its own shard. Buffers (rotary frequencies)
    are computed for real; they are tiny."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(padded_config(recipe, attention), dtype=dtype)
    # Built this way transformers leaves a tied output layer (Qwen3 small, Gemma 3) untied: it would
    # train as a second matrix and the export would keep only one of the two. Tied outside the
    # context, whose patched register_parameter would give the output layer a fresh meta copy.
    model.tie_weights()
    if recipe.model.lora is not None:
        with init_empty_weights(include_buffers=False):
            model = apply_lora(model, recipe)
    return model
