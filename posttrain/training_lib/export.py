"""Export the trained model in Hugging Face format (safetensors + tokenizer) for evaluation and
serving. The full state dict is gathered from the shards to rank 0 only. The merged model has the
base checkpoint's shapes: rows added by vocabulary padding at load are dropped. A recipe's custom
components (model.components) are written next to the weights, in `components/` (see
models/components.py: the safetensors, components.json naming the class, a README on loading)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftModel
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from posttrain import model_cache
from posttrain.recipe import Recipe
from posttrain.storage_fs import Store
from posttrain.training_lib.models.components import FOLDER as COMPONENTS_FOLDER
from posttrain.training_lib.models.components import save_components, split_state
from posttrain.training_lib.models.loading import apply_lora, pad_vocab, unpad_vocab
from posttrain.training_lib.models.with_loss import CausalLMWithLoss
from posttrain.uris import model_location


def export(model: torch.nn.Module, recipe: Recipe, out_dir: Path, rank: int) -> Path | None:
    """Collective: every rank calls it; rank 0 writes out_dir/model (merged) and out_dir/adapter
    (LoRA only; with `lora.merge_on_export: false` the adapter alone). Returns the folder on rank 0."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    # The recipe's components (a custom head) are no part of the HF model: they go to components/.
    full, parts = split_state(full)
    full = {k.removeprefix(CausalLMWithLoss.PREFIX): v for k, v in full.items()}
    config = AutoConfig.from_pretrained(model_location(recipe.model.base))
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    pad_vocab(fresh, recipe.model.pad_vocab_to_multiple_of)
    if recipe.model.lora is not None:
        fresh = apply_lora(fresh, recipe)
    fresh.load_state_dict({k: v.float() for k, v in full.items()}, strict=True)
    _keep_generation_config(fresh, model_location(recipe.model.base))
    tokenizer = AutoTokenizer.from_pretrained(model_location(recipe.tokenizer_uri))
    def with_components(folder: Path) -> None:
        save_components(folder, recipe, parts)

    if recipe.model.lora is not None:
        _save_atomic(fresh, tokenizer, out_dir / "adapter", with_components)
        if not recipe.model.lora.merge_on_export:
            return out_dir / "adapter"
        fresh = fresh.merge_and_unload()
    unpad_vocab(fresh)
    fresh.config.use_cache = True
    return _save_atomic(fresh, tokenizer, out_dir / "model", with_components)


def export_to_workspace(model: torch.nn.Module, recipe: Recipe, workspace: Store, rank: int) -> str | None:
    """Collective: `export` into the workspace; the URI of the model (or adapter-only) export on
    rank 0. On a local disk it is written in place. On an object store it is written to a scratch
    folder of the node's model cache and uploaded folder by folder, each with its commit.json last
    (the adapter first: a reader that finds model/ committed finds adapter/ too); each folder then
    stays as the cache's entry for its upload, so an evaluation on this node downloads nothing."""
    if workspace.local is not None:
        folder = export(model, recipe, workspace.local, rank)
        return f"{workspace.uri}/{folder.name}" if folder else None
    with model_cache.scratch("export") as scratch:
        folder = export(model, recipe, scratch, rank)
        if folder is None:
            return None
        for name in ("adapter", "model"):
            if (scratch / name).is_dir():
                model_cache.publish(scratch / name, (workspace / name).uri)
    return f"{workspace.uri}/{folder.name}"


def _keep_generation_config(model: torch.nn.Module, base: str) -> None:
    """The base's generation_config.json, not one derived from config.json: it names every token a
    reply may end with (Qwen3 `<|im_end|>` and `<|endoftext|>`, Gemma 3 `<eos>` and `<end_of_turn>`),
    which servers of the export read."""
    try:
        config = GenerationConfig.from_pretrained(base)
    except OSError:  # the base has none
        return
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    target.generation_config = config


def _save_atomic(model: torch.nn.Module, tokenizer: object, target: Path,
                 extra: Callable[[Path], None] | None = None) -> Path:
    """Write into `<target>.tmp` (and `extra(tmp)`: the components) and rename: a folder with the
    final name is always complete."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if extra is not None:
        extra(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def merged_from_adapter(recipe: Recipe, adapter_dir: Path, target: Path) -> Path:
    """Base + adapter merged into `target` (Hugging Face format with the tokenizer): what vLLM and
    the eval loss load when the export kept only the adapter."""
    base = AutoModelForCausalLM.from_pretrained(model_location(recipe.model.base), dtype=torch.float32)
    pad_vocab(base, recipe.model.pad_vocab_to_multiple_of)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    unpad_vocab(merged)
    merged.config.use_cache = True

    def copy_components(folder: Path) -> None:  # the adapter's head goes with the merged weights
        if (adapter_dir / COMPONENTS_FOLDER).is_dir():
            shutil.copytree(adapter_dir / COMPONENTS_FOLDER, folder / COMPONENTS_FOLDER)

    return _save_atomic(merged, AutoTokenizer.from_pretrained(str(adapter_dir)), target, copy_components)
