"""The EC2 side of a per-run Ray cluster against moto's EC2 server on loopback: what is launched
(types, AMI, network, profile, IMDSv2, encryption, tags, user-data), reuse by a retried setup, the
spot → on-demand fallback, teardown and `posttrain gc` leaving no instance of a run behind."""

from __future__ import annotations

import base64
import logging
import time
from datetime import timedelta
from typing import Any

from posttrain.gc import collect
from posttrain.hooks.ec2 import TAG_CLUSTER, TAG_DAG, TAG_RUN, Ec2ClusterHook, cluster_id_for, tag
from posttrain.recipe import Ec2Config, load_recipe
from tests.conftest import ec2_settings

LOG = logging.getLogger("test-ec2")


def config(network: dict, **overrides: Any) -> Ec2Config:
    return Ec2Config(**ec2_settings(network, **overrides))


def provision(cfg: Ec2Config, run_id: str, dag_id: str = "posttrain__t") -> tuple[Ec2ClusterHook, dict]:
    hook = Ec2ClusterHook("aws_moto", "us-east-1")
    labels = {TAG_CLUSTER: cluster_id_for(dag_id, run_id), TAG_DAG: dag_id, TAG_RUN: run_id}
    info = hook.provision(cfg, labels, "secret-token", gpus_per_node=1, deadline=time.monotonic() + 60, log=LOG)
    return hook, info


def user_data(ec2: Any, instance_id: str) -> str:
    value = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")["UserData"]["Value"]
    return base64.b64decode(value).decode()


def test_launch_parameters(ec2_network: dict) -> None:
    hook, info = provision(config(ec2_network), "manual__launch")
    ec2 = ec2_network["ec2"]
    instances = hook.instances(info["cluster_id"])
    assert len(instances) == 3
    head = next(i for i in instances if i["InstanceId"] == info["head_instance_id"])
    workers = [i for i in instances if i["InstanceId"] != info["head_instance_id"]]
    assert head["InstanceType"] == "m6i.xlarge" and {w["InstanceType"] for w in workers} == {"g5.xlarge"}
    for i in instances:
        assert i["ImageId"] == ec2_network["ami"] and i["SubnetId"] == ec2_network["subnet"]
        (eni,) = i["NetworkInterfaces"]  # launched with one interface: its groups are the node's
        assert [g["GroupId"] for g in eni["Groups"]] == [ec2_network["sg"]] and eni["SubnetId"] == ec2_network["subnet"]
        assert i["MetadataOptions"]["HttpTokens"] == "required"
        assert not i.get("PublicIpAddress")
        assert tag(i, TAG_CLUSTER) == info["cluster_id"] and tag(i, TAG_RUN) == "manual__launch"
        assert tag(i, TAG_DAG) == "posttrain__t" and tag(i, "team") == "ml"
        volumes = ec2.describe_volumes(Filters=[{"Name": "attachment.instance-id", "Values": [i["InstanceId"]]}])
        assert volumes["Volumes"] and all(v["Encrypted"] for v in volumes["Volumes"])
    # moto records the profile on the first instance of a multi-instance launch only.
    profiles = {i["InstanceId"]: (i.get("IamInstanceProfile") or {}).get("Arn") for i in instances}
    assert profiles[head["InstanceId"]].endswith("instance-profile/posttrain-ray-node")
    assert any(profiles[w["InstanceId"]] for w in workers)
    assert all(p is None or p.endswith("instance-profile/posttrain-ray-node") for p in profiles.values())
    head_script = user_data(ec2, head["InstanceId"])
    assert "ray start --head --port=6379" in head_script and "posttrain-ray:0.1.0" in head_script
    assert "RAY_AUTH_TOKEN=secret-token" in head_script and "--gpus all" not in head_script
    assert ("aws ecr get-login-password --region us-east-1 | docker login --username AWS --password-stdin "
            "123456789012.dkr.ecr.us-east-1.amazonaws.com") in head_script
    for w in workers:
        script = user_data(ec2, w["InstanceId"])
        assert f"ray start --address={head['PrivateIpAddress']}:6379" in script and "--gpus all" in script
    assert info["dashboard_url"] == f"http://{head['PrivateIpAddress']}:8265" and info["nodes"] == 3
    hook.terminate_cluster(info["cluster_id"])


def test_a_retried_setup_reuses_the_cluster_and_completes_it(ec2_network: dict) -> None:
    cfg = config(ec2_network)
    hook, first = provision(cfg, "manual__retry")
    _, again = provision(cfg, "manual__retry")
    assert again["head_instance_id"] == first["head_instance_id"]
    assert sorted(again["worker_instance_ids"]) == sorted(first["worker_instance_ids"])
    # One worker lost between tries: the retry launches exactly one, not a second cluster.
    ec2_network["ec2"].terminate_instances(InstanceIds=first["worker_instance_ids"][:1])
    _, third = provision(cfg, "manual__retry")
    assert len(hook.instances(first["cluster_id"])) == 3
    assert third["head_instance_id"] == first["head_instance_id"]
    assert first["worker_instance_ids"][1] in third["worker_instance_ids"]
    hook.terminate_cluster(first["cluster_id"])
    assert hook.instances(first["cluster_id"]) == []


def test_spot_workers_fall_back_to_on_demand_without_capacity(ec2_network: dict, caplog) -> None:
    from botocore.exceptions import ClientError

    hook = Ec2ClusterHook("aws_moto", "us-east-1")
    spot_calls = []

    def no_spot_capacity(params: dict, **_: Any) -> None:  # what EC2 answers when the pool is empty
        if "InstanceMarketOptions" in params:
            spot_calls.append(params["InstanceType"])
            raise ClientError({"Error": {"Code": "InsufficientInstanceCapacity", "Message": "no spot"}},
                              "RunInstances")

    hook.client.meta.events.register("provide-client-params.ec2.RunInstances", no_spot_capacity)
    cfg = config(ec2_network, spot_workers=True)
    labels = {TAG_CLUSTER: cluster_id_for("posttrain__t", "spot"), TAG_DAG: "posttrain__t", TAG_RUN: "spot"}
    with caplog.at_level(logging.WARNING, logger="test-ec2"):
        info = hook.provision(cfg, labels, "t", 1, time.monotonic() + 60, LOG)
    assert spot_calls == ["g5.xlarge"]
    assert "no spot capacity for 2 × g5.xlarge (InsufficientInstanceCapacity); launching on-demand" in caplog.text
    workers = [i for i in hook.instances(info["cluster_id"]) if i["InstanceId"] != info["head_instance_id"]]
    assert len(workers) == 2 and all(w.get("InstanceLifecycle") != "spot" for w in workers)
    hook.terminate_cluster(info["cluster_id"])


def test_gc_terminates_clusters_whose_run_is_over(ec2_network: dict) -> None:
    cfg = config(ec2_network, worker_nodes=1)
    hook, running = provision(cfg, "manual__still-running")
    _, failed = provision(cfg, "manual__marked-failed")
    states = {"manual__still-running": "running", "manual__marked-failed": "failed"}
    # Clusters of other tests on the same server count as running: this test leaves them alone.
    young = collect(hook, timedelta(hours=6), run_state=lambda dag, run: states.get(run, "running"))
    assert young["terminated"] == []  # both clusters are younger than 6 h
    report = collect(hook, timedelta(0), run_state=lambda dag, run: states.get(run, "running"))
    assert [c["cluster_id"] for c in report["terminated"]] == [failed["cluster_id"]]
    assert hook.instances(failed["cluster_id"]) == [] and len(hook.instances(running["cluster_id"])) == 2
    hook.terminate_cluster(running["cluster_id"])


def test_teardown_task_terminates_the_run_cluster_without_its_xcom(tmp_path, ec2_network: dict) -> None:
    """The teardown derives the cluster id from the run, so it needs neither the setup's XCom nor
    cluster.json: only the recipe in the workspace (written by the first task)."""
    from types import SimpleNamespace

    from posttrain.operators.ray_cluster import RayClusterTeardownOperator
    from tests.conftest import write_recipe

    recipe = load_recipe(write_recipe(tmp_path, name="ec2-teardown", compute={
        "provider": "ec2", "workers": 1, "ec2": ec2_settings(ec2_network, worker_nodes=1)}))
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "recipe.json").write_text(recipe.model_dump_json())
    hook, info = provision(recipe.compute.ec2, "manual__teardown", dag_id=recipe.dag_id)
    other_hook, other = provision(recipe.compute.ec2, "manual__another-run", dag_id=recipe.dag_id)
    teardown = RayClusterTeardownOperator(task_id="ray_cluster_teardown", workspace=f"file://{workspace}",
                                          cluster=None)
    context = {"ti": SimpleNamespace(dag_id=recipe.dag_id), "run_id": "manual__teardown"}
    result = teardown.execute(context)
    assert result["cluster_id"] == info["cluster_id"] and result["stopped"] == 2
    assert hook.instances(info["cluster_id"]) == []
    assert len(hook.instances(other["cluster_id"])) == 2  # another run's cluster is not touched
    hook.terminate_cluster(other["cluster_id"])


def test_gc_keeps_a_cluster_whose_run_it_cannot_find_unless_forced(ec2_network: dict) -> None:
    """A run missing from the metadata database (another deployment's, a reset database) is not proof
    that it is over: gc reports the cluster and leaves it, and terminates it only with --force."""
    cfg = config(ec2_network, worker_nodes=1)
    hook, unknown = provision(cfg, "manual__not-in-this-airflow", dag_id="posttrain__elsewhere")
    said: list[dict] = []
    mine = {unknown["cluster_id"]}

    def run_state(dag: str, run: str) -> str | None:  # other tests' clusters count as running
        return None if dag == "posttrain__elsewhere" else "running"

    report = collect(hook, timedelta(0), run_state=run_state, announce=said.append)
    [kept] = [c for c in report["kept"] if c["cluster_id"] in mine]
    assert kept["action"] == "keep" and "not in this Airflow's metadata database (--force" in kept["reason"]
    assert len(hook.instances(unknown["cluster_id"])) == 2
    assert [e["cluster_id"] for e in said if e["cluster_id"] in mine] == [unknown["cluster_id"]]  # said first
    forced = collect(hook, timedelta(0), run_state=run_state, force=True)
    assert [c["cluster_id"] for c in forced["terminated"]] == [unknown["cluster_id"]]
    assert hook.instances(unknown["cluster_id"]) == []
