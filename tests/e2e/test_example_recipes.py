"""Each paradigm's example recipe in dags/recipes runs end to end through its DAG on the tiny model:
validate → prepare → Ray cluster → train → evaluate → promote → teardown (storage moved under the
test's folder and the run shortened; everything else as committed)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import yaml

from posttrain.hooks.storage import StorageHook
from posttrain.paths import run_workspace
from posttrain.recipe import load_recipe
from posttrain.training_lib import checkpoint
from posttrain.uris import local_path
from tests.conftest import REPO, local_traces, run_recipe, task_states, workspace_of

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("airflow_db")]
RECIPES = REPO / "dags" / "recipes"


def example(tmp_path: Path, name: str, steps: int, storage: dict[str, str] | None = None) -> Path:
    """The committed recipe with absolute paths, storage under tmp_path (or `storage`) and `steps`
    training steps."""
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    data = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    data["model"]["base"] = recipe.model.base
    data["data"]["train"], data["data"]["eval"] = recipe.data.train, recipe.data.eval
    data["storage"] = storage or {"root": str(tmp_path / "storage")}
    if "kd" in data:
        data["kd"]["teacher"] = recipe.kd.teacher
    data["training"].update(max_steps=steps, checkpoint_every=steps)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_tiny_dpo_recipe_end_to_end(tmp_path: Path, tiny_model: Path) -> None:
    path = example(tmp_path, "tiny-dpo", steps=6)
    run = run_recipe(path)
    states = task_states(run)
    assert set(states.values()) == {"success"}, states
    ws = workspace_of(path, run)
    manifest = json.loads((ws / "data" / "manifest.json").read_text())
    assert manifest["format"] == "preference" and manifest["splits"]["train"]["pairs"] == 400
    rows = [json.loads(x) for x in (ws / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all("rewards/accuracy" in r and "rewards/margin" in r for r in rows)
    metrics = json.loads((ws / "eval" / "metrics.json").read_text())
    assert metrics["eval_pairs"] == 64 and 0.0 <= metrics["preference_accuracy"] <= 1.0
    assert metrics["dpo_loss"] > 0 and "reward_margin" in metrics
    recipe = load_recipe(path)
    champion = json.loads(local_path(recipe.champion_uri).read_text())
    assert champion["metric"] == "preference_accuracy" and champion["value"] == metrics["preference_accuracy"]


def test_tiny_kd_recipe_end_to_end(tmp_path: Path, tiny_model: Path, tiny_teacher: Path) -> None:
    path = example(tmp_path, "tiny-kd", steps=6)
    run = run_recipe(path)
    states = task_states(run)
    assert set(states.values()) == {"success"}, states
    ws = workspace_of(path, run)
    rows = [json.loads(x) for x in (ws / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["kd/forward_kl"] > 0 and r["kd/cross_entropy"] > 0 for r in rows)
    metrics = json.loads((ws / "eval" / "metrics.json").read_text())
    assert metrics["eval_loss"] > 0 and 0.0 <= metrics["exact_match"] <= 1.0 and metrics["kl_to_teacher"] > 0
    champion = json.loads(local_path(load_recipe(path).champion_uri).read_text())
    assert champion["metric"] == "eval_loss" and champion["value"] == metrics["eval_loss"]


def test_tiny_grpo_recipe_end_to_end_in_s3(tmp_path: Path, tiny_model: Path, tiny_teacher: Path, moto_server: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """GRPO with the run workspace in a bucket of moto's S3 server: the policy's checkpoints, the
    export the evaluation's vLLM engine loads and the results all there, nothing left on local disk."""
    import boto3

    bucket = f"grpo-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):  # moto is reached through the connection only
        monkeypatch.delenv(key, raising=False)
    path = example(tmp_path, "tiny-grpo", steps=4, storage={"root": f"s3://{bucket}/rl", "conn_id": "aws_moto"})
    run = run_recipe(path)
    states = task_states(run)
    assert set(states.values()) == {"success"}, states
    recipe = load_recipe(path)
    storage = StorageHook(recipe.storage.conn_id)
    ws = storage.store(run_workspace(recipe.storage.root, recipe.name, run.run_id))
    manifest = (ws / "data" / "manifest.json").read_json()
    assert manifest["format"] == "prompt" and manifest["splits"]["train"]["prompts"] == 400
    rows = [json.loads(x) for x in (ws / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all("reward/starts_with_the" in r and "reward/length_penalty" in r for r in rows)
    assert [p.name for p in checkpoint.complete_checkpoints(ws / "checkpoints")] == ["step-00000004"]
    metrics = (ws / "eval" / "metrics.json").read_json()
    assert metrics["eval_prompts"] == 32 and "reward/starts_with_the" in metrics
    samples = [json.loads(x) for x in (ws / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 32 and all(isinstance(s["generated"], str) for s in samples)
    champion = storage.store(recipe.champion_uri).read_json()
    assert champion["metric"] == "reward_mean" and champion["value"] == metrics["reward_mean"]
    assert champion["model_uri"].startswith(f"s3://{bucket}/")
    # The teardown removed the token; nothing of the run is on local disk.
    assert not (ws / "secrets").exists() and local_traces(bucket, ws.name) == []
