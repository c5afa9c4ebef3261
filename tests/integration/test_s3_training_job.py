"""The training job with an s3:// workspace (moto's server on loopback) on a local Ray head: the
prepared data, the checkpoints, the metrics, the MLflow database, Ray Train's state and the outputs
live in the bucket, and nothing of the run is written to the node's disk outside its model cache.
A run stopped mid-way and submitted again resumes from the newest complete checkpoint in the bucket
and ends exactly where an uninterrupted run ends: same loss at every step, same final weights, bit
for bit; the evaluate job of another node (its cache emptied) fetches the export from the bucket.
The base model is in the bucket too (model.base s3://...): every job loads it through the node's
model cache (posttrain/model_cache.py), downloaded once for the node. The jobs reach the bucket with
the storage connection's credentials, which the head got in its environment: they are in no job's
details or logs, and nowhere in the workspace."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load as load_safetensors

from posttrain.hooks.ray import TERMINAL_STATES, RayJobHook
from posttrain.prep.prepare import prepare
from posttrain.recipe import Recipe, load_recipe
from posttrain.storage_fs import Store
from posttrain.training_lib import checkpoint
from tests.conftest import local_ray_head, write_recipe
from tests.integration.test_training_job import wait

ENTRY = "{python} -m posttrain.training_lib.entrypoint train --workspace {uri}"


@pytest.fixture(scope="module")
def s3_cluster(moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A fresh bucket, a storage connection with a secret of its own, and a local Ray head started
    with that connection's node environment (StorageHook.node_environment: what the setup task of a
    local head gives it, as a node on EC2 has its instance profile). The head's processes have a
    disk of their own, `node`: their POSTTRAIN_HOME (model cache), HOME and TMPDIR."""
    import boto3

    from posttrain.hooks.storage import StorageHook

    secret = f"secret-{uuid.uuid4().hex}"
    os.environ["AIRFLOW_CONN_AWS_RUNS"] = json.dumps({
        "conn_type": "aws", "login": "runs-key", "password": secret,
        "extra": {"endpoint_url": moto_server, "region_name": "us-east-1"}})
    env = StorageHook("aws_runs").node_environment()
    assert env == {"AWS_ACCESS_KEY_ID": "runs-key", "AWS_SECRET_ACCESS_KEY": secret,
                   "AWS_ENDPOINT_URL_S3": moto_server, "AWS_DEFAULT_REGION": "us-east-1"}
    before = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # this process (prepare, the checks) reaches the bucket the same way
    bucket = f"runs-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    node = tmp_path_factory.mktemp("node")
    disk = {"POSTTRAIN_HOME": str(node), "HOME": str(node / "home"), "TMPDIR": str(node / "tmp")}
    for folder in ("home", "tmp"):
        (node / folder).mkdir()
    try:
        for info in local_ray_head(num_cpus=3, node_env=disk):
            yield {**info, "bucket": bucket, "secret": secret, "node": node}
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        os.environ.pop("AIRFLOW_CONN_AWS_RUNS", None)


def new_workspace(uri: str, recipe: Recipe) -> Store:
    store = Store.at(uri)
    (store / "recipe.json").write_text(recipe.model_dump_json())
    prepare(recipe, uri)
    return store


def losses(store: Store) -> dict[int, float]:
    rows = [json.loads(x) for x in (store / "train" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def node_files(node: Path) -> list[str]:
    """The files the head's processes wrote to their disk outside the node's model cache (Unix
    sockets, which hold no data, left out)."""
    return sorted(str(p.relative_to(node)) for p in node.rglob("*")
                  if p.is_file() and not p.is_socket() and not p.is_relative_to(node / "cache" / "models"))


def cache_entries(node: Path) -> dict[str, Path]:
    """The node's model-cache entries by the URI each holds."""
    from posttrain import model_cache

    root = node / "cache" / "models"
    return {json.loads((e / model_cache.ENTRY).read_text())["uri"]: e for e in root.iterdir()
            if (e / model_cache.ENTRY).is_file()} if root.is_dir() else {}


def test_killed_run_resumes_exactly_from_s3(tmp_path: Path, tiny_model: Path, s3_cluster: dict) -> None:
    from posttrain import model_cache

    steps, root = 20, f"s3://{s3_cluster['bucket']}/resume"
    base = f"s3://{s3_cluster['bucket']}/models/tiny"
    model_cache.upload(tiny_model, base)
    recipe = load_recipe(write_recipe(
        tmp_path, name="resume-s3", data={"packing": {"mode": "streaming", "buffer_docs": 64}},
        storage={"root": root}, model={"base": base},
        training={"max_steps": steps, "checkpoint_every": 5, "keep_checkpoints": 2, "learning_rate": 1e-3}))
    straight, interrupted = new_workspace(f"{root}/straight", recipe), new_workspace(f"{root}/interrupted", recipe)
    hook = RayJobHook(address=s3_cluster["dashboard_url"], token_file=s3_cluster["token_file"])

    def submit(store: Store, job_id: str) -> str:
        return hook.submit_job(ENTRY.format(python=s3_cluster["python"], uri=store.uri), job_id)

    status, logs = wait(hook, submit(straight, "s3-straight"))
    assert status == "SUCCEEDED", logs[-3000:]

    job = submit(interrupted, "s3-killed")
    deadline = time.monotonic() + 240
    while not checkpoint.is_complete(interrupted / "checkpoints" / "step-00000005"):
        assert time.monotonic() < deadline and hook.get_job(job)["status"] not in TERMINAL_STATES
        time.sleep(0.2)
    hook.stop_job(job)
    status, _ = wait(hook, job)
    assert status == "STOPPED"
    latest = checkpoint.latest_checkpoint(interrupted / "checkpoints")
    resumed_at = int(latest.name[len("step-"):])
    assert resumed_at < steps, "the job finished before it could be killed; nothing was resumed"

    status, logs = wait(hook, submit(interrupted, "s3-resumed"))
    assert status == "SUCCEEDED", logs[-3000:]
    assert f"resumed from {latest.uri} at step {resumed_at}" in logs

    # The base came from the bucket through the node's cache (the jobs have no other way to it), and
    # each export is the cache's entry for its upload: an evaluation on this node downloads nothing.
    node = s3_cluster["node"]
    entries = cache_entries(node)
    assert (entries[base] / "model.safetensors").read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    # (The resumed run's export is the same bytes, so the same commit.json: the entry serves both.)
    assert f"{straight.uri}/model" in entries
    assert (interrupted / "model" / "commit.json").read_bytes() == (straight / "model" / "commit.json").read_bytes()
    # Nothing else of the runs on the node's disk: no staging of metrics, MLflow, Ray Train or exports.
    assert node_files(node) == []
    assert losses(interrupted) == losses(straight)
    assert sorted(losses(straight)) == list(range(1, steps + 1))
    a, b = (load_safetensors((s / "model" / "model.safetensors").read_bytes()) for s in (straight, interrupted))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    # What is left in the bucket: the kept complete checkpoints only, and the job's outputs.
    for store in (straight, interrupted):
        assert (store / "checkpoints").listdir() == [f"step-{s:08d}" for s in (15, 20)]
        assert all(checkpoint.is_complete(p) for p in checkpoint.complete_checkpoints(store / "checkpoints"))
        summary = (store / "train" / "summary.json").read_json()
        assert summary["steps"] == steps and summary["model_dir"] == f"{store.uri}/model"
        # The run's MLflow database (one run across the killed and the resumed job) and Ray Train's state.
        assert (store / "train" / "mlflow.db").read_bytes()[:16] == b"SQLite format 3\x00"
        assert (store / "ray_train" / "train").listdir()

    # Evaluation on a node that did not train (its cache emptied): the export comes from the bucket,
    # the results go there.
    shutil.rmtree(node / "cache" / "models")
    evaluate = ENTRY.replace(" train ", " evaluate ").format(python=s3_cluster["python"], uri=straight.uri)
    status, logs = wait(hook, hook.submit_job(evaluate, "s3-evaluate"))
    assert status == "SUCCEEDED", logs[-3000:]
    assert (straight / "eval" / "metrics.json").read_json()["eval_loss"] > 0
    assert (straight / "eval" / "per_example.parquet").exists() and (straight / "eval" / "samples.jsonl").exists()
    # It loaded the export through the node's model cache (an entry fetched from the run's model/,
    # checked against its commit.json), and wrote nothing else to the node's disk.
    assert f"{straight.uri}/model" in cache_entries(node) and node_files(node) == []

    # The secret is in no job's details (entrypoint, runtime_env, metadata) or logs, nor in the
    # workspace or the node's cache.
    secret = s3_cluster["secret"]
    for job_id in ("s3-straight", "s3-killed", "s3-resumed", "s3-evaluate"):
        assert secret not in json.dumps(hook.get_job(job_id)) and secret not in hook.get_job_logs(job_id)
    workspace = Store.at(root)
    assert all(secret.encode() not in (workspace / name).read_bytes() for name in workspace.sizes())
    cached = [p for p in (node / "cache").rglob("*") if p.is_file()]
    assert cached and all(secret.encode() not in p.read_bytes() for p in cached)
