"""Export the trained model in Hugging Face format (safetensors + tokenizer) for evaluation and
serving. The full state dict is gathered from the shards to rank 0 only."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from posttrain.recipe import Recipe
from posttrain.training_lib.models.loading import apply_lora, model_location, pad_vocab
from posttrain.training_lib.models.with_loss import CausalLMWithLoss


def export(model: torch.nn.Module, recipe: Recipe, out_dir: Path, rank: int) -> Path | None:
    """Collective: every rank calls it; rank 0 writes out_dir/model (merged) and out_dir/adapter
    (LoRA only). Returns the model folder on rank 0."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    full = {k.removeprefix(CausalLMWithLoss.PREFIX): v for k, v in full.items()}
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_location(recipe.model.base))
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    pad_vocab(fresh, recipe.model.pad_vocab_to_multiple_of)
    if recipe.model.lora is not None:
        fresh = apply_lora(fresh, recipe)
    fresh.load_state_dict({k: v.float() for k, v in full.items()}, strict=True)
    if recipe.model.lora is not None:
        fresh.save_pretrained(out_dir / "adapter")
        fresh = fresh.merge_and_unload()
    model_dir = out_dir / "model"
    tmp = out_dir / "model.tmp"
    fresh.config.use_cache = True
    fresh.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_location(recipe.tokenizer_uri)).save_pretrained(tmp)
    if model_dir.exists():
        import shutil

        shutil.rmtree(model_dir)
    tmp.rename(model_dir)
    return model_dir
