"""dags/recipes/tiny-sft-s3.yaml end to end through its DAG with the run workspace in a bucket of
moto's S3 server (loopback): validate → Ray cluster → prepare (`data.prepare: ray`) → train →
evaluate → promote → teardown, every artifact of the run in the bucket, nothing of it on the local
disk (what the jobs write to a node's disk is tested in tests/integration/test_s3_training_job.py)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml

from posttrain.hooks.storage import StorageHook
from posttrain.recipe import load_recipe
from posttrain.training_lib import checkpoint
from tests.conftest import REPO, local_traces, run_recipe, task_states

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("airflow_db")]


def test_tiny_sft_s3_recipe_end_to_end(tmp_path: Path, tiny_model: Path, moto_server: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3


    committed = REPO / "dags" / "recipes" / "tiny-sft-s3.yaml"
    recipe = load_recipe(committed)
    data = yaml.safe_load(committed.read_text())
    bucket = f"runs-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    data["model"]["base"] = recipe.model.base
    data["data"]["train"], data["data"]["eval"] = recipe.data.train, recipe.data.eval
    # Prepared by a Ray Data job on the run's cluster, the shards written by its workers straight to the
    # bucket (the local prepare's S3 path: tests/integration/test_s3_storage.py).
    data["data"]["prepare"] = "ray"
    data["storage"]["root"] = f"s3://{bucket}/tiny"
    data["training"].update(max_steps=4, checkpoint_every=2)
    data["evaluation"].update(max_samples=8, max_new_tokens=8)
    path = tmp_path / "tiny-sft-s3.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    # The recipe's storage connection, on the moto server. The setup task starts the local Ray head
    # with that connection's node environment: this process has no S3 endpoint in its own.
    monkeypatch.setenv("AIRFLOW_CONN_POSTTRAIN_S3", (
        f'{{"conn_type": "aws", "login": "testing", "password": "testing", '
        f'"extra": {{"endpoint_url": "{moto_server}", "region_name": "us-east-1"}}}}'))
    for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)

    run = run_recipe(path)
    states = task_states(run)
    assert set(states.values()) == {"success"}, states

    storage = StorageHook(recipe.storage.conn_id)  # this process reaches moto only through the connection
    root = storage.store(f"s3://{bucket}/tiny/tiny-sft-s3")
    (workspace,) = (root / "runs" / name for name in (root / "runs").listdir())
    manifest = (workspace / "data" / "manifest.json").read_json()
    assert manifest["splits"]["train"]["rows"] == 400
    assert all((workspace / shard).exists() for s in manifest["splits"].values() for shard in s["shards"])
    assert [p.name for p in checkpoint.complete_checkpoints(workspace / "checkpoints")] == \
        (workspace / "checkpoints").listdir() == ["step-00000002", "step-00000004"]
    summary = (workspace / "train" / "summary.json").read_json()
    assert summary["steps"] == 4 and summary["model_dir"] == f"{workspace.uri}/model"
    assert (workspace / "model" / "model.safetensors").exists()
    metrics = (workspace / "eval" / "metrics.json").read_json()
    assert metrics["eval_loss"] > 0
    champion = (root / "champion.json").read_json()
    assert champion["value"] == metrics["eval_loss"] and champion["model_uri"].startswith(root.uri)
    assert (storage.store(champion["model_uri"]) / "model.safetensors").exists()
    # Ray Train's state, the metrics and the run's MLflow database are in the bucket too.
    assert (workspace / "ray_train" / "train").listdir() and (workspace / "train" / "metrics.jsonl").exists()
    assert (workspace / "train" / "mlflow.db").exists()
    # The teardown of the local head removed the cluster's token; nothing of the run is on local disk.
    assert not (workspace / "secrets").exists()
    assert local_traces(bucket, workspace.name) == []
