"""The EC2 fault matrix: each step of a run's cluster made to fail in turn, against moto's EC2
server, and after each no instance tagged with the run may be left running.

Setup failures go through the recipe DAG itself (dag.test: validate → prepare → ray_cluster fails
→ its last try terminates what it launched, since Airflow skips the teardown of a failed setup).
A failing training job goes through the DAG too: moto's instances run nothing, so the recipe's
`dashboard_url` points the setup at a two-node Ray cluster on 127.0.0.1 (head + one worker, the
shape the recipe asks for), the job fails on the cluster, and the teardown must still run; that
run's workspace is in a bucket of moto's S3 server, so no task shares a local directory.
The rest drive the same hook the operators use: a spot pool with no capacity, a retried setup, and
a run marked failed from outside (`posttrain gc` finds it through Airflow's metadata database)."""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from posttrain.gc import airflow_run_state, collect
from posttrain.hooks.ec2 import ALL_STATES, TAG_CLUSTER, TAG_DAG, TAG_RUN, Ec2ClusterHook, cluster_id_for
from posttrain.recipe import Ec2Config
from posttrain.storage_fs import Store
from tests.conftest import ec2_settings, multinode_ray, run_recipe, task_states, write_recipe

LOG = logging.getLogger("fault-matrix")
SETUP_FAULTS = {
    "head launch fails (AMI not found)": {"ami": "ami-00000000000000000"},
    "worker launch fails (type rejected)": {"worker_instance_type": "g5.99xlarge"},
    "Ray never answers (wait times out)": {"launch_timeout_s": 30, "dashboard_url": "http://127.0.0.1:9"},
}


@pytest.fixture
def two_node_ray(tmp_path: Path, moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A head and one worker node on 127.0.0.1, stopped afterwards. Its processes reach moto's S3
    from their environment, as EC2 nodes reach S3 with their instance profile."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server)
    yield from multinode_ray(2, tmp_path / "ray.log")


def launched_and_running(hook: Ec2ClusterHook, cluster_id: str) -> tuple[int, int]:
    return len(hook.instances(cluster_id, states=ALL_STATES)), len(hook.instances(cluster_id))


@pytest.mark.slow
def test_no_fault_leaves_an_instance_running(tmp_path: Path, ec2_network: dict, airflow_db: None, tiny_model: Path,
                                             two_node_ray: dict, moto_server: str, capfd: Any) -> None:
    hook = Ec2ClusterHook("aws_moto", "us-east-1")
    rows: list[tuple[str, str, int, int]] = []

    last_run = None
    for i, (case, fault) in enumerate(SETUP_FAULTS.items()):
        recipe_path = write_recipe(tmp_path / f"case{i}", name=f"ec2-fault-{i}", compute={
            "provider": "ec2", "workers": 1, "ec2": ec2_settings(ec2_network, worker_nodes=1, **fault)})
        run = run_recipe(recipe_path)
        states = task_states(run)
        failed = ", ".join(t for t, s in states.items() if s == "failed") or "-"
        assert states["ray_cluster"] == "failed" and states["train"] in ("upstream_failed", "None")
        cluster = cluster_id_for(run.dag_id, run.run_id)
        rows.append((case, failed, *launched_and_running(hook, cluster)))
        last_run = run

    # Training fails on the cluster (a model whose weights file is damaged): the teardown still runs.
    # The run's workspace is in S3, so nothing of the run is on the worker's disk: the cluster's token
    # is in the bucket too. (A file:// workspace on EC2: the deployment's "nothing left running" row.)
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"\0" * 64)
    storage = s3_storage(moto_server)
    recipe_path = write_recipe(tmp_path / "train-fails", name="ec2-fault-train", model={"base": str(broken)},
                               **storage, compute={
                                   "provider": "ec2", "workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 1,
                                   "ec2": ec2_settings(ec2_network, worker_nodes=1,
                                                       dashboard_url=two_node_ray["dashboard_url"])})
    capfd.readouterr()
    run = run_recipe(recipe_path)
    states = task_states(run)
    assert states["ray_cluster"] == "success" and states["train"] == "failed", states
    assert states["ray_cluster_teardown"] == "success", states
    # It failed for the damaged weights, not on the way to them (the bucket, the token).
    assert "Error while deserializing header" in "".join(capfd.readouterr())
    cluster = cluster_id_for(run.dag_id, run.run_id)
    rows.append(("training fails (damaged weights, s3:// workspace)", "train", *launched_and_running(hook, cluster)))
    ws = Store.at(storage["storage"]["root"])
    assert not [p for p in ws.fs.find(ws.path) if "/secrets/" in p]  # the teardown removed the token

    # Spot capacity error: workers fall back to on-demand; the teardown then terminates them all.
    def no_spot(params: dict, **_: Any) -> None:
        from botocore.exceptions import ClientError

        if "InstanceMarketOptions" in params:
            raise ClientError({"Error": {"Code": "InsufficientInstanceCapacity", "Message": "none"}}, "RunInstances")

    hook.client.meta.events.register("provide-client-params.ec2.RunInstances", no_spot)
    cfg = Ec2Config(**ec2_settings(ec2_network, spot_workers=True))
    cluster = provision(hook, cfg, "posttrain__spot", "manual__spot")
    hook.terminate_cluster(cluster)
    rows.append(("spot capacity error → on-demand, teardown", "-", *launched_and_running(hook, cluster)))

    # A retried setup finds the first try's instances by tag and launches nothing twice.
    cfg = Ec2Config(**ec2_settings(ec2_network))
    cluster = provision(hook, cfg, "posttrain__retry", "manual__retry")
    provision(hook, cfg, "posttrain__retry", "manual__retry")
    assert launched_and_running(hook, cluster) == (3, 3)
    hook.terminate_cluster(cluster)
    rows.append(("setup retried (reuses 3 instances), teardown", "-", *launched_and_running(hook, cluster)))

    # A run marked failed from outside never reaches its teardown: gc reads its state from Airflow.
    assert airflow_run_state(last_run.dag_id, last_run.run_id) == "failed"
    cluster = provision(hook, cfg, last_run.dag_id, last_run.run_id)
    report = collect(hook, timedelta(0))
    assert cluster in [c["cluster_id"] for c in report["terminated"]]
    rows.append(("run marked failed from outside → posttrain gc", "-", *launched_and_running(hook, cluster)))

    leaks = sum(r[3] for r in rows)
    with capfd.disabled():
        print("\n" + render(rows) + f"\nleaked instances: {leaks}")
    assert leaks == 0
    assert hook.instances() == []  # nothing of any posttrain cluster is left on the server


def s3_storage(moto_server: str) -> dict[str, Any]:
    """A recipe's storage section on a fresh bucket of moto's server."""
    import boto3

    bucket = f"fault-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return {"storage": {"root": f"s3://{bucket}/runs", "conn_id": "aws_moto"}}


def provision(hook: Ec2ClusterHook, cfg: Ec2Config, dag_id: str, run_id: str) -> str:
    cluster = cluster_id_for(dag_id, run_id)
    labels = {TAG_CLUSTER: cluster, TAG_DAG: dag_id, TAG_RUN: run_id}
    hook.provision(cfg, labels, "token", 0, time.monotonic() + 60, LOG)
    return cluster


def render(rows: list[tuple[str, str, int, int]]) -> str:
    head = ("fault", "failed task", "instances launched", "left running")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(4)]
    return "\n".join(" | ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)) for r in [head, *rows])
