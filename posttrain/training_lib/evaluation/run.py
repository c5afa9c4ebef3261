"""The evaluate stage: eval loss (teacher-forced) and vLLM generation metrics for the export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from posttrain.prep.tokenizer import require_same_tokenizer
from posttrain.recipe import Recipe
from posttrain.training_lib.evaluation.distill import divergence_to_teacher
from posttrain.training_lib.evaluation.generate import generate_and_score
from posttrain.training_lib.evaluation.loss import eval_loss
from posttrain.training_lib.evaluation.preference import preference_metrics
from posttrain.training_lib.evaluation.rewards import reward_metrics
from posttrain.training_lib.export import merged_from_adapter


def run(recipe: Recipe, workspace: Path) -> dict:
    if not recipe.data.eval:
        raise RuntimeError(f"recipe {recipe.name}: data.eval is not set, there is nothing to evaluate on")
    model_dir = workspace / "model"
    if not model_dir.exists() and (workspace / "adapter").exists():  # adapter-only export: merge to evaluate
        model_dir = merged_from_adapter(recipe, workspace / "adapter", workspace / "eval" / "merged")
    require_same_tokenizer(str(model_dir), workspace)
    wanted = recipe.evaluation.metrics
    metrics: dict = {}
    samples: list[dict] = []
    if recipe.paradigm == "dpo":
        metrics.update(preference_metrics(recipe, model_dir, workspace))
    if recipe.paradigm == "grpo":
        reward_scores, samples = reward_metrics(recipe, model_dir, workspace)
        metrics.update(reward_scores)
    if "kl_to_teacher" in wanted:
        metrics.update(divergence_to_teacher(recipe, model_dir, workspace))
    if "eval_loss" in wanted:
        metrics.update(eval_loss(model_dir, workspace))
    if recipe.data.format == "chat":  # generated samples are kept for reading even without the metric
        gen_metrics, samples = generate_and_score(recipe, model_dir)
        if "exact_match" in wanted:
            metrics.update(gen_metrics)
    out = workspace / "eval"
    out.mkdir(parents=True, exist_ok=True)
    with (out / "samples.jsonl").open("w") as fh:
        for sample in samples:
            fh.write(json.dumps(sample) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if model_dir.name == "merged":  # scratch: the published artifact is the adapter
        shutil.rmtree(model_dir)
    print("eval metrics: " + json.dumps(metrics), flush=True)
    return metrics
