"""Promotion by paired comparison (promotion.decision: confidence, the default) on per-example
results written by the real evaluation path: the eval loss of the tiny model and of a copy whose
logits are sharpened (clearly worse), on the prepared sample eval split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from posttrain.promotion_stats import read_table
from posttrain.recipe import load_recipe
from posttrain.uris import local_path
from tests.conftest import run_dag_file, task_states, write_recipe
from tests.integration.test_promotion import promote_dag


def sharpened_copy(tiny_model: Path, out: Path) -> Path:
    """The tiny model with its final norm ×3: logits ×3, a clearly higher loss on every example."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        model.model.norm.weight.mul_(3.0)
    model.save_pretrained(out)
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name.endswith(".jinja"):
            shutil.copy(f, out / f.name)
    return out


def evaluated_run(recipe_path: Path, prepared: Path, model: Path, workspace: Path, **promotion) -> float:
    """A run workspace as train and evaluate leave it: the model, its eval loss, its per-example file."""
    from posttrain.training_lib.evaluation import per_example
    from posttrain.training_lib.evaluation.loss import eval_loss

    recipe = load_recipe(recipe_path)
    recipe = recipe.model_copy(update={"promotion": recipe.promotion.model_copy(update=promotion)})
    shutil.copytree(model, workspace / "model")
    (workspace / "recipe.json").write_text(recipe.model_dump_json())
    metrics, per_line = eval_loss(model, prepared)
    ids = per_example.ids_by_line(recipe.data.eval)
    manifest = json.loads((prepared / "data" / "manifest.json").read_text())
    per_example.write(workspace / "eval", per_line, ids, {
        "eval_fingerprint": per_example.fingerprint(ids.values()),
        "tokenizer_fingerprint": manifest["tokenizer"]["fingerprint"]})
    (workspace / "eval" / "metrics.json").write_text(json.dumps(metrics))
    return metrics["eval_loss"]


def promote(workspace: Path) -> tuple[str, dict]:
    run = run_dag_file(promote_dag("paired", f"file://{workspace}", None), "paired")
    return task_states(run)["promote"], json.loads((workspace / "promotion" / "decision.json").read_text())


@pytest.mark.usefixtures("airflow_db")
def test_promotion_pairs_examples_with_the_champion(tmp_path: Path, tiny_model: Path) -> None:
    from posttrain.prep.prepare import prepare

    recipe_path = write_recipe(tmp_path, name="paired")
    recipe = load_recipe(recipe_path)
    prepared = tmp_path / "prepared"
    prepare(recipe, prepared)
    worse = sharpened_copy(tiny_model, tmp_path / "sharp")
    champion_file = local_path(recipe.champion_uri)

    # The worse model first: no champion yet, promoted; its per-example results are kept with it.
    worse_loss = evaluated_run(recipe_path, prepared, worse, tmp_path / "r1")
    state, decision = promote(tmp_path / "r1")
    assert state == "success" and decision["comparison"] is None
    champion = json.loads(champion_file.read_text())
    columns, meta = read_table(str(local_path(champion["per_example_uri"])))
    assert len(columns["example_id"]) == 64 and len(set(columns["example_id"])) == 64  # one row per eval row
    assert sum(columns["eval_loss__tokens"]) == json.loads((tmp_path / "r1" / "eval" / "metrics.json").read_text())[
        "eval_tokens"]
    assert champion["tokenizer_fingerprint"] == meta["tokenizer_fingerprint"] and champion["eval_fingerprint"]

    # The tiny model is better on the same examples: the interval lies below 0, promoted; the paired
    # difference is the difference of the two eval_loss values.
    better_loss = evaluated_run(recipe_path, prepared, tiny_model, tmp_path / "r2")
    state, decision = promote(tmp_path / "r2")
    comparison = decision["comparison"]
    assert state == "success" and decision["promoted"] is True, decision["reason"]
    assert comparison["n"] == 64 and comparison["difference"] == pytest.approx(better_loss - worse_loss, rel=1e-5)
    assert comparison["low"] <= comparison["difference"] <= comparison["high"] < 0
    assert "n=64" in decision["reason"] and "so promoted" in decision["reason"]

    # The same model again: a difference of 0 with an interval of [0, 0] does not clear 0.
    evaluated_run(recipe_path, prepared, tiny_model, tmp_path / "r3")
    state, decision = promote(tmp_path / "r3")
    assert state == "skipped" and decision["comparison"]["high"] == 0.0 and "so not promoted" in decision["reason"]

    # A champion evaluated on another eval set (its fingerprint differs): not compared, not promoted.
    kept = local_path(json.loads(champion_file.read_text())["per_example_uri"])
    original = kept.read_bytes()
    table = pq.read_table(kept)
    pq.write_table(table.replace_schema_metadata({"posttrain": json.dumps({"eval_fingerprint": "0" * 64})}), kept)
    state, decision = promote(tmp_path / "r3")
    assert state == "skipped" and "different eval set" in decision["reason"] and decision["comparison"] is None
    kept.write_bytes(original)

    # A champion from before per-example results: confidence cannot compare and does not promote;
    # mean compares the aggregates as before.
    legacy = {k: v for k, v in json.loads(champion_file.read_text()).items() if k != "per_example_uri"}
    champion_file.write_text(json.dumps({**legacy, "value": better_loss + 1.0}))
    evaluated_run(recipe_path, prepared, tiny_model, tmp_path / "r4")
    state, decision = promote(tmp_path / "r4")
    assert state == "skipped" and decision["reason"].startswith("could not compare with champion")
    evaluated_run(recipe_path, prepared, tiny_model, tmp_path / "r5", decision="mean")
    state, decision = promote(tmp_path / "r5")
    assert state == "success" and "beats champion" in decision["reason"]
