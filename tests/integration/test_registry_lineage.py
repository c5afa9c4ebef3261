"""The MLflow Model Registry (a real SQLite store), the champion Asset event's lineage, the extra
links and OpenLineage events (the OpenLineage provider's listener writing to a file transport),
after promotions through Airflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.recipe import load_recipe
from posttrain.registry import registry_uri
from posttrain.uris import local_path
from tests.conftest import DAGS, free_port, run_dag_file, task_states, write_recipe
from tests.integration.test_promotion import fake_run_workspace

MANIFEST = {"format": "chat", "tokenizer": {"fingerprint": "tok-123"}, "splits": {"train": {"rows": 400}}}


def promote_dag(dag_id: str, recipe_path: Path, workspace: Path) -> str:
    """promote with the champion Asset as its outlet, as the factory builds it."""
    return ("from datetime import datetime\nfrom airflow.sdk import DAG\n"
            "from posttrain.dags.factory import champion_asset\n"
            "from posttrain.operators.promote import PromoteOperator\n"
            "from posttrain.recipe import load_recipe\n"
            f"with DAG({dag_id!r}, schedule=None, start_date=datetime(2024, 1, 1)) as dag:\n"
            f"    PromoteOperator(task_id='promote', workspace={f'file://{workspace}'!r},\n"
            f"                    outlets=[champion_asset(load_recipe({str(recipe_path)!r}))])\n")


def trained_workspace(recipe_path: Path, workspace: Path, eval_loss: float) -> str:
    """A workspace as train and evaluate leave it, with the training job's MLflow run in the
    recipe's default store; returns that run's id."""
    from mlflow import MlflowClient

    fake_run_workspace(recipe_path, workspace, eval_loss)
    (workspace / "data").mkdir(exist_ok=True)
    (workspace / "data" / "manifest.json").write_text(json.dumps(MANIFEST))
    uri, _ = registry_uri(load_recipe(recipe_path))
    local_path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name("reg")
    run_id = client.create_run(found.experiment_id if found else client.create_experiment("reg")).info.run_id
    (workspace / "train").mkdir(exist_ok=True)
    (workspace / "train" / "mlflow_run.json").write_text(json.dumps({"tracking_uri": uri, "run_id": run_id}))
    return run_id


@pytest.mark.usefixtures("airflow_db")
def test_promotion_registers_the_version_and_the_asset_event_carries_the_lineage(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    recipe_path = write_recipe(tmp_path, name="reg", promotion={"decision": "mean"},
                               tracking={"ui_url": "http://127.0.0.1:5000/"})
    recipe = load_recipe(recipe_path)
    workspace = tmp_path / "ws"
    run_id = trained_workspace(recipe_path, workspace, 2.0)
    events = tmp_path / "openlineage.jsonl"
    (DAGS / "promote_reg.py").write_text("# airflow dag file written by the tests\n"
                                         + promote_dag("promote_reg", recipe_path, workspace))
    # A process of its own: the OpenLineage listener is registered when Airflow loads its plugins,
    # and only if a transport is configured then (an earlier test in this process had none).
    env = {**os.environ, "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
        {"type": "file", "log_file_path": str(events), "append": True}),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": "posttrain-test"}
    done = subprocess.run([sys.executable, "-m", "airflow", "dags", "test", "promote_reg"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # The registry: version 1, its source the workspace export, the training run, the alias on it.
    client = MlflowClient(registry_uri(recipe)[0])
    version = client.get_model_version_by_alias("reg", "champion")
    assert (str(version.version), version.source, version.run_id) == ("1", f"file://{workspace}/model", run_id)
    tags = version.tags
    assert tags["posttrain.recipe"] == "reg" and tags["posttrain.paradigm"] == "sft"
    assert tags["posttrain.tokenizer_fingerprint"] == "tok-123" and len(tags["posttrain.recipe_sha256"]) == 64
    assert tags["posttrain.metric.eval_loss"] == "2" and tags["posttrain.decision_value"] == "2"
    assert tags["posttrain.provider_version"] and tags["posttrain.base_model"] == recipe.model.base
    decision = json.loads((workspace / "promotion" / "decision.json").read_text())
    assert decision["registry"] == {"tracking_uri": registry_uri(recipe)[0], "name": "reg", "version": "1",
                                    "run_id": run_id, "alias_moved": True}

    # The champion Asset event's extra, as a DAG scheduled on it reads it.
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        event = session.scalars(select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
                                .where(AssetModel.name == "posttrain/reg/champion")).one()
        extra = event.extra
        links = {x.key: x.value for x in session.scalars(select(XComModel).where(
            XComModel.dag_id == "promote_reg", XComModel.key.like("_link_%")))}
    assert extra["version"] == decision["version"] and extra["model_uri"] == decision["model_uri"]
    assert (extra["metric"], extra["value"], extra["model_version"], extra["mlflow_run_id"]) == \
           ("eval_loss", 2.0, "1", run_id)
    assert extra["registered_model"] == "reg" and extra["run_id"] and "interval" in extra
    links = {k: json.loads(v) if isinstance(v, str) and v.startswith('"') else v for k, v in links.items()}
    assert links["_link_MlflowModelVersionLink"] == "http://127.0.0.1:5000/#/models/reg/versions/1"
    assert links["_link_MlflowRunLink"].endswith(f"/runs/{run_id}")

    # OpenLineage: promote's COMPLETE event names what it read and wrote.
    lines = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
    complete = [e for e in lines if e.get("eventType") == "COMPLETE" and e["job"]["name"].endswith(".promote")]
    assert complete, [(e.get("eventType"), e.get("job", {}).get("name")) for e in lines]
    inputs = {(d["namespace"], d["name"]) for d in complete[-1]["inputs"]}
    outputs = {(d["namespace"], d["name"]) for d in complete[-1]["outputs"]}
    assert ("file", f"{workspace}/model") in inputs
    assert ("file", local_path(decision["model_uri"]).as_posix()) in outputs
    assert ("file", local_path(recipe.champion_uri).as_posix()) in outputs

    # A second, better challenger: version 2, and the alias moves to it.
    second = tmp_path / "ws2"  # another run, another workspace
    trained_workspace(recipe_path, second, 1.0)
    run = run_dag_file(promote_dag("promote_reg2", recipe_path, second), "promote_reg2")
    assert task_states(run)["promote"] == "success"
    champion = client.get_model_version_by_alias("reg", "champion")
    assert (str(champion.version), champion.source) == ("2", f"file://{second}/model")


@pytest.mark.usefixtures("airflow_db")
def test_registry_down_does_not_lose_the_promotion(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    recipe_path = write_recipe(tmp_path, name="reg-down", promotion={"decision": "mean"},
                               tracking={"mlflow_uri": dead})
    workspace = tmp_path / "ws"
    fake_run_workspace(recipe_path, workspace, 2.0)
    run = run_dag_file(promote_dag("promote_reg_down", recipe_path, workspace), "promote_reg_down")
    assert task_states(run)["promote"] == "success"
    champion = json.loads(local_path(load_recipe(recipe_path).champion_uri).read_text())
    decision = json.loads((workspace / "promotion" / "decision.json").read_text())
    assert decision["promoted"] and champion["version"] == decision["version"]
    registry = decision["registry"]
    assert registry["alias_moved"] is False and f"registering in {dead} failed" in registry["error"]
    assert "failed" in json.loads((workspace / "eval" / "registry.json").read_text())["error"]
