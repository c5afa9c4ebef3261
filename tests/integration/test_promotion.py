"""Promotion: champion/challenger decisions, a pointer that only ever names a complete copy, and
the same code on S3 (moto's server on loopback) through ObjectStoragePath."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posttrain.operators.promote import decide
from posttrain.recipe import load_recipe
from posttrain.uris import local_path
from tests.conftest import SAMPLE_DATA, run_dag_file, task_states, workspace_of, write_recipe


@pytest.mark.parametrize(("value", "champion", "mode", "margin", "promote"), [
    (1.0, None, "min", 0.0, True),
    (0.9, 1.0, "min", 0.0, True),
    (1.0, 1.0, "min", 0.0, False),
    (0.95, 1.0, "min", 0.1, False),
    (0.85, 1.0, "min", 0.1, True),
    (0.6, 0.5, "max", 0.0, True),
    (0.4, 0.5, "max", 0.0, False),
])
def test_decision(value, champion, mode, margin, promote) -> None:
    record = None if champion is None else {"value": champion, "version": "v1"}
    assert decide(value, record, mode, margin, "m")[0] is promote


def promote_dag(dag_id: str, workspace: str, conn_id: str | None) -> str:
    return ("from datetime import datetime\nfrom airflow.sdk import DAG\n"
            "from posttrain.operators.promote import PromoteOperator\n"
            f"with DAG({dag_id!r}, schedule=None, start_date=datetime(2024, 1, 1)) as dag:\n"
            f"    PromoteOperator(task_id='promote', workspace={workspace!r}, storage_conn_id={conn_id!r})\n")


def fake_run_workspace(recipe_path: Path, workspace: Path, eval_loss: float) -> None:
    """What train and evaluate leave behind, for promote to act on."""
    recipe = load_recipe(recipe_path)
    (workspace / "eval").mkdir(parents=True, exist_ok=True)
    (workspace / "model").mkdir(exist_ok=True)
    (workspace / "recipe.json").write_text(recipe.model_dump_json())
    (workspace / "eval" / "metrics.json").write_text(json.dumps({"eval_loss": eval_loss, "exact_match": 0.0}))
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (workspace / "model" / name).write_text(f"{name} of the model with loss {eval_loss}")


@pytest.mark.usefixtures("airflow_db")
def test_champion_pointer_is_replaced_atomically(tmp_path: Path, monkeypatch) -> None:
    # decision: mean, because these fake runs have no per-example results to pair (see below for
    # the default, confidence, on real ones).
    recipe_path = write_recipe(tmp_path, name="promo", promotion={"decision": "mean"})
    recipe = load_recipe(recipe_path)
    workspace = tmp_path / "ws"
    champion_file = local_path(recipe.champion_uri)

    fake_run_workspace(recipe_path, workspace, 2.0)
    first = run_dag_file(promote_dag("promote_file", f"file://{workspace}", None), "promote_file")
    assert task_states(first)["promote"] == "success"
    champion = json.loads(champion_file.read_text())
    promoted = local_path(champion["model_uri"])
    # The copy, and its commit.json (every file's size and sha256, checked at the target) last.
    assert sorted(p.name for p in promoted.iterdir()) == ["commit.json", "config.json", "model.safetensors",
                                                          "tokenizer.json"]
    commit = json.loads((promoted / "commit.json").read_text())
    assert commit["files"]["config.json"]["size"] == (workspace / "model" / "config.json").stat().st_size
    assert champion["value"] == 2.0 and champion["previous_version"] is None

    # A worse challenger: skipped (no asset event), pointer untouched, reason recorded.
    fake_run_workspace(recipe_path, workspace, 2.5)
    second = run_dag_file(promote_dag("promote_file", f"file://{workspace}", None), "promote_file")
    assert task_states(second)["promote"] == "skipped"
    assert json.loads(champion_file.read_text()) == champion
    decision = json.loads((workspace / "promotion" / "decision.json").read_text())
    assert decision["promoted"] is False and "is not lower than champion" in decision["reason"]

    # A better challenger whose copy dies half way: the pointer still names the complete old copy.
    from posttrain.operators import promote

    real_copy = promote.copy_tree_verified

    def copy_then_die(src, dst):
        real_copy(src, dst)
        raise OSError("disk full while copying the model")

    monkeypatch.setattr(promote, "copy_tree_verified", copy_then_die)
    fake_run_workspace(recipe_path, workspace, 1.0)
    third = run_dag_file(promote_dag("promote_file", f"file://{workspace}", None), "promote_file")
    assert task_states(third)["promote"] == "failed"
    assert json.loads(champion_file.read_text()) == champion
    assert not any(p.name.endswith(".tmp") for p in champion_file.parent.iterdir())
    monkeypatch.setattr(promote, "copy_tree_verified", real_copy)

    # Retried, it completes and the pointer moves to the new version.
    fourth = run_dag_file(promote_dag("promote_file", f"file://{workspace}", None), "promote_file")
    assert task_states(fourth)["promote"] == "success"
    new = json.loads(champion_file.read_text())
    assert new["value"] == 1.0 and new["previous_version"] == champion["version"]


@pytest.mark.usefixtures("airflow_db")
def test_promotion_on_s3_through_moto(tmp_path: Path, moto_server: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket="models")
    recipe_path = write_recipe(tmp_path, name="s3-promo",
                               storage={"root": "s3://models/posttrain", "conn_id": "aws_moto"})
    local_ws = tmp_path / "ws"
    fake_run_workspace(recipe_path, local_ws, 1.5)
    pq.write_table(pa.table({"example_id": ["1-a", "2-b"], "eval_loss__sum": [3.0, 1.5], "eval_loss__tokens": [2, 1]}),
                   local_ws / "eval" / "per_example.parquet")
    # An export on S3 comes with its commit.json (storage_fs.upload_folder): promotion checks the copy against it.
    files = {f.name: {"size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
             for f in sorted((local_ws / "model").iterdir())}
    (local_ws / "model" / "commit.json").write_text(json.dumps({"files": files}))
    prefix = "posttrain/s3-promo/runs/r1"
    for path in local_ws.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), "models", f"{prefix}/{path.relative_to(local_ws)}")

    run = run_dag_file(promote_dag("promote_s3", f"s3://models/{prefix}", "aws_moto"), "promote_s3")
    assert task_states(run)["promote"] == "success"
    champion = json.loads(s3.get_object(Bucket="models", Key="posttrain/s3-promo/champion.json")["Body"].read())
    assert champion["model_uri"].startswith("s3://models/posttrain/s3-promo/promoted/")
    key_prefix = champion["model_uri"].removeprefix("s3://models/") + "/"
    objects = s3.list_objects_v2(Bucket="models", Prefix=key_prefix)["Contents"]
    keys = sorted(o["Key"].removeprefix(key_prefix) for o in objects)
    assert keys == ["commit.json", "config.json", "model.safetensors", "tokenizer.json"]
    # Copied by the S3 server (CopyObject with a SHA256 checksum it computed), not through the worker.
    head = s3.head_object(Bucket="models", Key=key_prefix + "model.safetensors", ChecksumMode="ENABLED")
    assert base64.b64decode(head["ChecksumSHA256"]).hex() == files["model.safetensors"]["sha256"]
    # The per-example results a later run pairs with, kept beside the promoted model.
    assert champion["per_example_uri"] == f"s3://models/posttrain/s3-promo/evaluations/{champion['version']}/" \
                                          "per_example.parquet"
    kept = s3.get_object(Bucket="models", Key=champion["per_example_uri"].removeprefix("s3://models/"))["Body"]
    assert pq.read_table(pa.BufferReader(kept.read())).column("example_id").to_pylist() == ["1-a", "2-b"]
    listing = s3.list_objects_v2(Bucket="models", Prefix="posttrain/s3-promo/")["Contents"]
    assert not any(o["Key"].endswith(".tmp") for o in listing)


@pytest.mark.usefixtures("airflow_db")
def test_training_data_on_s3_is_validated_and_prepared(tmp_path: Path, moto_server: str) -> None:
    """Data read from s3:// through the recipe's connection, streamed, by the same code as file://."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket="etl")
    for split in ("train", "eval"):
        s3.upload_file(str(SAMPLE_DATA / f"{split}.jsonl"), "etl", f"chat/{split}.jsonl")
    recipe = write_recipe(tmp_path, name="s3-data", data={"train": "s3://etl/chat/train.jsonl",
                                                          "eval": "s3://etl/chat/eval.jsonl"},
                          storage={"root": str(tmp_path / "storage"), "conn_id": "aws_moto"})
    source = (
        "from datetime import datetime\nfrom airflow.sdk import DAG\n"
        "from posttrain.operators.recipe import ResolveRecipeOperator\n"
        "from posttrain.operators.validate import ValidateDataOperator\n"
        "from posttrain.operators.prepare import PrepareDataOperator\n"
        "with DAG('s3_data', schedule=None, start_date=datetime(2024, 1, 1)) as dag:\n"
        "    c = 'aws_moto'\n"
        f"    r = ResolveRecipeOperator(task_id='resolve_recipe', recipe_path={str(recipe)!r}, storage_conn_id=c)\n"
        "    v = ValidateDataOperator(task_id='validate_data', workspace=r.output['workspace'], storage_conn_id=c)\n"
        "    p = PrepareDataOperator(task_id='prepare_data', workspace=r.output['workspace'], storage_conn_id=c)\n"
        "    v >> p\n")
    run = run_dag_file(source, "s3_data")
    assert set(task_states(run).values()) == {"success"}
    ws = workspace_of(recipe, run)
    report = json.loads((ws / "validation" / "report.json").read_text())
    assert report["splits"]["train"]["rows"] == 400 and report["success"]
    manifest = json.loads((ws / "data" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == 400 and manifest["splits"]["eval"]["rows"] == 64
