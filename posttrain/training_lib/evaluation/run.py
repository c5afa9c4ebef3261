"""The evaluate stage: eval loss (teacher-forced) and vLLM generation metrics for the export.

Writes eval/metrics.json (the aggregates), eval/samples.jsonl (generations to read) and
eval/per_example.parquet (each example's values, for promotion's paired comparison)."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

from posttrain import model_cache
from posttrain.prep.tokenizer import require_same_tokenizer
from posttrain.recipe import Recipe
from posttrain.storage_fs import COMMIT, Store, workspace_store
from posttrain.training_lib.data.loader import read_manifest, read_prompts
from posttrain.training_lib.data.pairs import read_pairs
from posttrain.training_lib.evaluation import per_example
from posttrain.training_lib.evaluation.distill import divergence_to_teacher
from posttrain.training_lib.evaluation.generate import generate_and_score
from posttrain.training_lib.evaluation.loss import eval_loss
from posttrain.training_lib.evaluation.preference import preference_metrics
from posttrain.training_lib.evaluation.rewards import reward_metrics
from posttrain.training_lib.export import merged_from_adapter
from posttrain.training_lib.models.components import components_of


def exported(workspace: Store, name: str) -> Path | None:
    """The run's export `name` (model/ or adapter/) as a local folder, None where there is none. On
    a local disk, the workspace's own; for an object-store workspace, this node's model-cache entry
    (keyed by the export's commit.json: the train job's own export when it ran on this node, else
    downloaded once, every file checked against its sha256; the evaluate jobs of later runs on the
    node reuse it when the export is promoted unchanged)."""
    if workspace.local is not None:
        return workspace.local / name if (workspace.local / name).exists() else None
    store = workspace / name
    return model_cache.model_dir(store.uri) if (store / COMMIT).exists() else None


def run(recipe: Recipe, workspace: Store | Path) -> dict:
    with ExitStack() as stack:
        return _run(recipe, workspace_store(workspace), stack)


def _run(recipe: Recipe, workspace: Store, stack: ExitStack) -> dict:
    if not recipe.data.eval:
        raise RuntimeError(f"recipe {recipe.name}: data.eval is not set, there is nothing to evaluate on")
    model_dir = exported(workspace, "model")
    if model_dir is None:
        adapter = exported(workspace, "adapter")
        if adapter is None:
            raise RuntimeError(f"{workspace.uri}: no complete model/ or adapter/ export: run the train stage first")
        # An adapter-only export: base + adapter merged for vLLM and the loss, in a scratch folder of
        # the node's model cache that goes when the evaluation ends (the published artifact is the adapter).
        model_dir = merged_from_adapter(recipe, adapter, stack.enter_context(model_cache.scratch("merged")) / "merged")
    require_same_tokenizer(str(model_dir), workspace)
    wanted = recipe.evaluation.metrics
    metrics: dict = {}
    samples: list[dict] = []
    # Per-example values by key: the eval file's line (chat) or the position in the prepared split
    # (pairs, prompts: prepare keeps no line for them), and the example ids of those keys.
    by_key: dict[int, dict] = {}
    ids: dict[int, str] = {}
    if recipe.paradigm == "dpo":
        scores, per_pair = preference_metrics(recipe, model_dir, workspace)
        metrics.update(scores)
        by_key = dict(enumerate(per_pair))
        ids = dict(enumerate(per_example.content_ids(read_pairs(workspace, "eval"))))
    if recipe.paradigm == "grpo":
        reward_scores, samples, per_prompt = reward_metrics(recipe, model_dir, workspace)
        metrics.update(reward_scores)
        by_key = dict(enumerate(per_prompt))
        prompts = read_prompts(workspace, "eval")[: len(per_prompt)]
        ids = dict(enumerate(per_example.content_ids({"prompt": p["messages"], "answer": p["answer"]}
                                                     for p in prompts)))
    if recipe.data.format == "chat":
        ids = per_example.ids_by_line(recipe.data.eval)
    if "kl_to_teacher" in wanted:
        divergence, per_line = divergence_to_teacher(recipe, model_dir, workspace)
        metrics.update(divergence)
        _merge(by_key, per_line)
    if "eval_loss" in wanted:
        loss, per_line = eval_loss(model_dir, workspace)
        metrics.update(loss)
        _merge(by_key, per_line)
    if components_of(model_dir):
        # vLLM serves the Hugging Face weights only: its generations would be those of a model without
        # the recipe's head, not the trained one (the schema refuses generation metrics with a head).
        print(f"no generations: the export carries model.components {sorted(components_of(model_dir))}, which "
              "vLLM cannot run; eval_loss includes them", flush=True)
    elif recipe.data.format == "chat":  # generated samples are kept for reading even without the metric
        gen_metrics, samples, per_line = generate_and_score(recipe, model_dir)
        if "exact_match" in wanted:
            metrics.update(gen_metrics)
        else:
            per_line = {line: {"generated": v["generated"]} for line, v in per_line.items()}
        _merge(by_key, per_line)
    out = workspace / "eval"
    (out / "samples.jsonl").write_text("".join(json.dumps(sample) + "\n" for sample in samples))
    per_example.write(out, by_key, ids, {
        "eval_data": recipe.data.eval, "eval_fingerprint": per_example.fingerprint(ids.values()),
        "tokenizer_fingerprint": read_manifest(workspace)["tokenizer"]["fingerprint"]})
    (out / "metrics.json").write_json(metrics)  # last: what the evaluate task reads
    print("eval metrics: " + json.dumps(metrics), flush=True)
    return metrics


def _merge(into: dict[int, dict], values: dict[int, dict]) -> None:
    for key, row in values.items():
        into.setdefault(key, {}).update(row)
