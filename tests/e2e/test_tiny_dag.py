"""The whole DAG on the tiny model, twice: the first run trains, evaluates with vLLM and becomes
champion; the second trains a challenger and is compared with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.hooks.local_ray import LocalRayCluster
from posttrain.promotion_stats import read_table
from posttrain.recipe import load_recipe
from posttrain.uris import local_path
from tests.conftest import run_recipe, task_states, workspace_of, write_recipe

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("airflow_db")]


def test_tiny_sft_end_to_end_champion_then_challenger(tmp_path: Path, tiny_model: Path) -> None:
    recipe_path = write_recipe(tmp_path, name="e2e-sft", training={"max_steps": 6, "checkpoint_every": 3})
    recipe = load_recipe(recipe_path)

    first = run_recipe(recipe_path)
    states = task_states(first)
    assert set(states.values()) == {"success"}, states
    ws = workspace_of(recipe_path, first)

    manifest = json.loads((ws / "data" / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    assert train["rows"] == 400 and train["fill_ratio"] > 0.9
    assert train["documents"] + train["dropped_overlong"] + train["dropped_no_target"] == train["rows"]
    assert len(manifest["tokenizer"]["fingerprint"]) == 16

    summary = json.loads((ws / "train" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["last_loss"] < summary["first_loss"]
    assert summary["plan"]["strategy"] == "fsdp" and summary["plan"]["world_size"] == 2
    assert sorted(p.name for p in (ws / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    model = ws / "model"
    assert (model / "model.safetensors").exists() and (model / "tokenizer.json").exists()

    metrics = json.loads((ws / "eval" / "metrics.json").read_text())
    assert metrics["eval_loss"] > 0 and 0.0 <= metrics["exact_match"] <= 1.0 and metrics["generated_samples"] == 8
    samples = [json.loads(line) for line in (ws / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all(isinstance(s["generated"], str) for s in samples)
    # The vocabulary is padded past the tokenizer (500 → 512): padding rows are never sampled.
    vocab = manifest["tokenizer"]["size"]
    assert vocab == 500 and all(t < vocab for s in samples for t in s["generated_token_ids"])

    # Per example: every eval row's loss (summing to the aggregate) and the generations.
    columns, _ = read_table(str(ws / "eval" / "per_example.parquet"))
    assert len(columns["example_id"]) == 64 and sum(columns["eval_loss__tokens"]) == metrics["eval_tokens"]
    assert sum(columns["eval_loss__sum"]) / metrics["eval_tokens"] == pytest.approx(metrics["eval_loss"], rel=1e-6)
    assert sum(g is not None for g in columns["generated"]) == 8

    champion = json.loads(local_path(recipe.champion_uri).read_text())
    assert champion["version"] in str(ws) and champion["value"] == metrics["eval_loss"]
    assert local_path(champion["per_example_uri"]).exists()
    assert (local_path(champion["model_uri"]) / "model.safetensors").exists()
    cluster = json.loads((ws / "cluster.json").read_text())
    assert LocalRayCluster.processes(cluster) == []

    second = run_recipe(recipe_path)
    states = task_states(second)
    ws2 = workspace_of(recipe_path, second)
    decision = json.loads((ws2 / "promotion" / "decision.json").read_text())
    assert decision["previous_champion"]["version"] == champion["version"]
    # Paired with the champion on the same 64 examples (promotion.decision: confidence, the default).
    assert decision["comparison"]["n"] == 64 and "n=64" in decision["reason"]
    if decision["promoted"]:
        assert states["promote"] == "success"
        assert json.loads(local_path(recipe.champion_uri).read_text())["previous_version"] == champion["version"]
    else:
        assert states["promote"] == "skipped" and "champion" in decision["reason"]
        assert json.loads(local_path(recipe.champion_uri).read_text()) == champion
    assert str(second.state) == "success"
