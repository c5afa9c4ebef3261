"""Test environment: everything generated lives under .posttrain/test in the repo, Airflow runs on
SQLite with its own dags folder, nothing reaches a hub, and every server is on 127.0.0.1.

The environment is set before anything imports airflow (it reads its configuration once)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from posttrain.paths import use_repo_tmpdir

REPO = Path(__file__).resolve().parents[1]
HOME = Path(os.environ.get("POSTTRAIN_HOME") or REPO / ".posttrain").resolve()
# `make test` runs the suite on pytest-xdist workers (gw0, gw1, ...): each has an Airflow home,
# SQLite database and dags folder of its own. Models, caches and Ray temp dirs are shared (their
# names are unique, and the model cache locks).
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
TEST_HOME = HOME / "test" / WORKER if WORKER else HOME / "test"
DAGS = TEST_HOME / "dags"
TINY = HOME / "models" / "tiny"
SAMPLE_DATA = REPO / "dags" / "data" / "tiny-chat"

os.environ["POSTTRAIN_HOME"] = str(HOME)
os.environ["AIRFLOW_HOME"] = str(TEST_HOME / "airflow")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
# A consumer DAG must be unpaused for an asset event to queue a run of it.
os.environ["AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION"] = "False"
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{TEST_HOME}/airflow/airflow.db"
# The Ray job stages defer to the triggerer, as in the compose file (Airflow's default is not to).
os.environ["AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE"] = "True"
for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo",
                   "RAY_USAGE_STATS_ENABLED": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                   "GX_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)
# Temp files of this process and everything it starts (Ray workers, vLLM) stay in the repo.
use_repo_tmpdir()


def pytest_configure(config: pytest.Config) -> None:
    if not config.option.basetemp:  # (xdist's workers get <this>/gw<n> from the controller)
        TEST_HOME.mkdir(parents=True, exist_ok=True)
        config.option.basetemp = str(TEST_HOME / "tmp")


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadscope` (`make test`) with a test module as the unit of work, so its module-scoped
    Ray head and models are set up once, and tests/deployment as one unit: its modules share one
    deployment. (xdist's loadgroup would do this with marks, but its node-id rewriting does not
    reach pytest 9's node ids.)"""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "tests/deployment" if module.startswith("tests/deployment/") else module

    return ModuleScheduling(config, log)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The shared tiny model + tokenizer (built once; `make test` builds it before pytest)."""
    if not (TINY / "config.json").exists():
        from posttrain.training_lib.models.tiny import build_tiny

        build_tiny(TINY)
    return TINY


def tiny_family(name: str) -> Path:
    """The tiny model of a family (`posttrain tiny-model --family`), built once through the CLI. The
    folder is named by a digest of the family's definition, so a changed family is rebuilt."""
    import hashlib

    from posttrain.cli import main
    from posttrain.training_lib.models.families import family

    fam = family(name)
    digest = hashlib.sha256(repr(fam).encode() + fam.chat_template().encode()).hexdigest()[:10]
    out = HOME / "models" / f"tiny-{name}-{digest}"
    from filelock import FileLock

    with FileLock(out.with_name(out.name + ".lock")):  # another xdist worker may be building it
        if not (out / "config.json").exists():
            assert main(["tiny-model", str(out), "--family", name]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_teacher(tiny_model: Path) -> Path:
    """The distillation teacher: the tiny model fine-tuned briefly (`make test` builds it too)."""
    teacher = TINY.parent / "tiny-teacher"
    if not (teacher / "config.json").exists():
        from posttrain.training_lib.models.tiny import build_tiny_teacher

        build_tiny_teacher(teacher, tiny_model, SAMPLE_DATA / "train.jsonl")
    return teacher


@pytest.fixture(scope="session")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def airflow_db() -> None:
    """A fresh SQLite metadata database for this session."""
    shutil.rmtree(TEST_HOME / "airflow", ignore_errors=True)
    shutil.rmtree(DAGS, ignore_errors=True)
    (TEST_HOME / "airflow").mkdir(parents=True)
    DAGS.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, stdout=subprocess.DEVNULL,
                   env=os.environ.copy())


def write_recipe(folder: Path, name: str = "t-sft", **sections: Any) -> Path:
    """A small recipe on the tiny model and the sample data, storage under `folder`.
    Keyword arguments replace whole top-level sections or merge into dict sections."""
    recipe: dict[str, Any] = {
        "name": name,
        "paradigm": "sft",
        "model": {"base": str(TINY)},
        "data": {"train": str(SAMPLE_DATA / "train.jsonl"), "eval": str(SAMPLE_DATA / "eval.jsonl"),
                 "max_seq_len": 256, "validation": {"min_rows": 50, "max_overlong_fraction": 0.1}},
        "training": {"max_steps": 4, "learning_rate": 3e-3, "micro_batch_size": 2, "checkpoint_every": 2},
        "compute": {"provider": "local", "workers": 2},
        "evaluation": {"max_new_tokens": 8, "max_samples": 8},
        "storage": {"root": str(folder / "storage")},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(recipe.get(key), dict):
            recipe[key] = {**recipe[key], **value}
        else:
            recipe[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_dag_file(source: str, dag_id: str, run_conf: dict | None = None) -> Any:
    """Write a DAG file into the test dags folder, parse it, and run it with dag.test()."""
    from airflow.dag_processing.dagbag import DagBag

    path = DAGS / f"{dag_id.replace('-', '_')}.py"
    path.write_text("# airflow dag file written by the tests\n" + source)
    bag = DagBag(dag_folder=str(path))
    assert not bag.import_errors, bag.import_errors
    return bag.dags[dag_id].test(run_conf=run_conf)


def run_recipe(recipe_path: Path, run_conf: dict | None = None) -> Any:
    from posttrain.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    source = ("from posttrain.dags import load_recipe_dags\n"
              f"globals().update(load_recipe_dags({str(recipe_path.parent)!r}, only={recipe_path.name!r}))\n")
    return run_dag_file(source, recipe.dag_id, run_conf)


def task_states(dag_run: Any) -> dict[str, str]:
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        tis = session.scalars(select(TaskInstance).where(TaskInstance.dag_id == dag_run.dag_id,
                                                         TaskInstance.run_id == dag_run.run_id)).all()
        return {ti.task_id: str(ti.state) for ti in tis}


def workspace_of(recipe_path: Path, dag_run: Any) -> Path:
    from posttrain.paths import run_workspace
    from posttrain.recipe import load_recipe
    from posttrain.uris import local_path

    recipe = load_recipe(recipe_path)
    return local_path(run_workspace(recipe.storage.root, recipe.name, dag_run.run_id))


def local_traces(*needles: str) -> list[str]:
    """Paths on this machine's posttrain home (Ray temp, model cache, anything a job could stage to)
    whose name holds one of `needles` (a run's bucket, its workspace folder): what an object-store
    run left on the local disk."""
    return sorted(str(p) for p in HOME.rglob("*") if any(n in p.name for n in needles))


def free_port() -> int:
    from posttrain.hooks.local_ray import free_ports

    return free_ports(1)[0]


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """moto's server on a free loopback port, with an `aws_moto` Airflow connection pointing at it."""
    port = free_port()
    # Instance types are checked as EC2 checks them (an unknown type fails the launch).
    env = {**os.environ, "MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION": "true"}
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)
    os.environ["AIRFLOW_CONN_AWS_MOTO"] = json.dumps({
        "conn_type": "aws", "login": "testing", "password": "testing",
        "extra": {"endpoint_url": url, "region_name": "us-east-1"}})
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(key, "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        os.environ.pop("AIRFLOW_CONN_AWS_MOTO", None)


def local_ray_head(num_cpus: int, node_env: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """A local Ray head on 127.0.0.1 (a fixture's body), `node_env` in its processes' environment;
    afterwards not one of its processes is left."""
    from posttrain.hooks.local_ray import LocalRayCluster

    info = LocalRayCluster.start(num_cpus=num_cpus, node_env=node_env)
    try:
        yield info
    finally:
        LocalRayCluster.stop(info)
    assert LocalRayCluster.processes(info) == []


def multinode_ray(nodes: int, log: Path) -> Iterator[dict[str, str]]:
    """A Ray cluster of `nodes` nodes on 127.0.0.1 (tests/multinode_ray.py, a fixture's body): what
    an EC2 cluster looks like to the run; afterwards not one of its processes is left."""
    import psutil

    from posttrain.paths import ray_temp_dir

    ready = log.with_suffix(".ready.json")
    ready.unlink(missing_ok=True)
    temp = ray_temp_dir(f"mn{uuid.uuid4().hex[:4]}")  # short: Ray's Unix socket paths must fit under it
    env = {**os.environ, "RAY_TMPDIR": str(temp), "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with log.open("w") as out:
        from posttrain.hooks.local_ray import free_ports

        # Dashboard, GCS, then each node's dashboard agent: all distinct.
        dashboard, gcs, *agents = [str(port) for port in free_ports(2 + nodes)]
        proc = subprocess.Popen([sys.executable, "-m", "tests.multinode_ray", str(nodes), dashboard, gcs, str(ready),
                                 *agents],
                                cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
    family: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        family = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
        yield json.loads(ready.read_text())
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)
    assert not [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[dict[str, Any]]:
    """A local Ray head for one test module."""
    yield from local_ray_head(num_cpus=3)


@pytest.fixture(scope="session")  # one per moto server: the instance profile can exist only once
def ec2_network(moto_server: str) -> dict[str, Any]:
    """A VPC, subnet, security group, instance profile and AMI on the moto server."""
    import boto3

    kw = {"endpoint_url": moto_server, "region_name": "us-east-1"}
    ec2, iam = boto3.client("ec2", **kw), boto3.client("iam", **kw)
    vpc = ec2.create_vpc(CidrBlock="10.7.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.7.1.0/24")["Subnet"]["SubnetId"]
    sg = ec2.create_security_group(GroupName="ray", Description="ray nodes", VpcId=vpc)["GroupId"]
    iam.create_instance_profile(InstanceProfileName="posttrain-ray-node")
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    return {"ec2": ec2, "subnet": subnet, "sg": sg, "ami": ami}


def ec2_settings(network: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """A recipe's compute.ec2 for the moto network (a head and 2 g5.xlarge workers)."""
    return {"aws_conn_id": "aws_moto", "region": "us-east-1", "head_instance_type": "m6i.xlarge",
            "worker_instance_type": "g5.xlarge", "worker_nodes": 2, "ami": network["ami"],
            "subnet_id": network["subnet"], "security_group_ids": [network["sg"]],
            "iam_instance_profile": "posttrain-ray-node", "tags": {"team": "ml"},
            "image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/posttrain-ray:0.1.0", **overrides}
