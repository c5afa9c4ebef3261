"""How runs start, on a real Airflow (dag.test, SQLite): upstream ETL assets, and manual triggers
whose parameters are typed, whitelisted and re-validated against the recipe schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_dag_file, run_recipe, task_states, workspace_of, write_recipe

pytestmark = pytest.mark.usefixtures("airflow_db")


def test_producer_asset_update_queues_the_recipe_dag(tmp_path: Path) -> None:
    from airflow.models.asset import AssetDagRunQueue
    from airflow.utils.session import create_session
    from sqlalchemy import select

    uri = f"file://{tmp_path}/etl/chat-latest.jsonl"
    recipe = write_recipe(tmp_path / "recipes", name="etl-consumer", trigger_on_assets=[uri])
    (Path(__import__("os").environ["AIRFLOW__CORE__DAGS_FOLDER"]) / "etl_consumer.py").write_text(
        "# airflow dag\nfrom posttrain.dags import load_recipe_dags\n"
        f"globals().update(load_recipe_dags({str(recipe.parent)!r}, only={recipe.name!r}))\n")
    producer = (
        "from datetime import datetime\nfrom airflow.sdk import DAG, Asset, task\n"
        "with DAG('etl_producer', schedule=None, start_date=datetime(2024, 1, 1)) as dag:\n"
        f"    @task(outlets=[Asset({uri!r})])\n"
        "    def publish():\n        return 'new data'\n"
        "    publish()\n")
    run = run_dag_file(producer, "etl_producer")
    assert str(run.state) == "success"
    with create_session() as session:
        queued = session.scalars(select(AssetDagRunQueue.target_dag_id)).all()
    assert "posttrain__etl-consumer" in queued


def test_param_outside_its_bounds_is_refused_at_trigger(tmp_path: Path) -> None:
    from airflow.sdk.exceptions import ParamValidationError

    recipe = write_recipe(tmp_path, name="bounds")
    with pytest.raises(ParamValidationError):
        run_recipe(recipe, run_conf={"learning_rate": 5.0})


def test_conf_key_outside_the_whitelist_fails_the_first_task(tmp_path: Path, capfd) -> None:
    recipe = write_recipe(tmp_path, name="whitelist")
    run = run_recipe(recipe, run_conf={"storage_root": "file:///elsewhere"})
    states = task_states(run)
    assert states["resolve_recipe"] == "failed"
    assert all(states[t] in ("upstream_failed", "None", "skipped") for t in ("validate_data", "train", "promote"))
    assert states["report"] == "skipped" and str(run.state) == "failed"  # no workspace to report on
    out = capfd.readouterr()
    assert "params.storage_root: cannot be overridden at run time; allowed: learning_rate" in out.out + out.err


def test_override_that_breaks_the_schema_fails_clearly(tmp_path: Path, capfd) -> None:
    recipe = write_recipe(tmp_path, name="schema-check")
    run = run_recipe(recipe, run_conf={"eval_data": None})
    assert task_states(run)["resolve_recipe"] == "failed"
    out = capfd.readouterr()
    assert "data.eval is required" in out.out + out.err


def test_a_plan_over_the_memory_budget_fails_before_any_cluster_starts(tmp_path: Path, capfd) -> None:
    recipe = write_recipe(tmp_path, name="budget", compute={"workers": 2, "memory_per_worker_gib": 0.001})
    run = run_recipe(recipe, run_conf={"max_steps": 3})
    states = task_states(run)
    assert states["resolve_recipe"] == "failed"
    assert all(states[t] in ("upstream_failed", "None") for t in ("validate_data", "ray_cluster", "train"))
    out = capfd.readouterr()
    assert "compute.memory_per_worker_gib: the plan needs about" in out.out + out.err


def test_overrides_reach_the_workspace_and_bad_data_fails_validation(tmp_path: Path, capfd) -> None:
    """Valid overrides are merged into the run's recipe.json; Great Expectations then fails the
    run on bad data with a readable summary and a JSON + HTML report, before any cluster starts."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"messages": [{"role": "user", "content": "hi"}]}\n'
                    b'{"messages": [{"role": "robot", "content": ""}, {"role": "assistant", "content": "x"}]}\n'
                    b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n')
    recipe = write_recipe(tmp_path, name="gx-fail")
    run = run_recipe(recipe, run_conf={"train_data": f"file://{bad}", "max_steps": 3, "learning_rate": 0.01})
    states = task_states(run)
    assert states["resolve_recipe"] == "success" and states["validate_data"] == "failed"
    assert states["ray_cluster"] == "upstream_failed"
    workspace = workspace_of(recipe, run)
    resolved = json.loads((workspace / "recipe.json").read_text())
    assert resolved["training"]["max_steps"] == 3 and resolved["training"]["learning_rate"] == 0.01
    assert resolved["data"]["train"] == f"file://{bad}"
    report = json.loads((workspace / "validation" / "report.json").read_text())
    assert not report["splits"]["train"]["success"] and report["splits"]["eval"]["success"]
    failed = {r["rule"]: r["example_lines"] for r in report["splits"]["train"]["rules"] if not r["success"]}
    assert failed == {"at least min_rows examples": [], "last turn is from the assistant": [1],
                      "roles are system, user, assistant": [2], "content is not empty": [2]}
    assert "FAIL" in (workspace / "validation" / "report.html").read_text()
    # The run report is written all the same (its task does not decide the run's state), says what is
    # missing, and the report task's "Run report" link opens it.
    assert states["report"] == "success" and str(run.state) == "failed"
    html = (workspace / "report.html").read_text()
    assert '<section class="panel" id="train-loss" data-has-data="false">' in html
    assert "No data: data/manifest.json was not written" in html
    assert link_xcoms(run, "_link_RunReportLink") == {"report": f"file://{workspace}/report.html"}
    out = capfd.readouterr()
    assert "rule 'roles are system, user, assistant' failed (1 failing) e.g. line(s) 2" in out.out + out.err
    assert not (workspace / "cluster.json").exists()


def link_xcoms(run, key: str) -> dict[str, str]:  # noqa: ANN001
    """task id → the URL its extra link `key` (the link's xcom_key) stored when the task ended."""
    from types import SimpleNamespace

    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.execute(select(XComModel.task_id, XComModel.value).where(
            XComModel.dag_id == run.dag_id, XComModel.run_id == run.run_id, XComModel.key == key)).all()
    return {task: XComModel.deserialize_value(SimpleNamespace(value=value)) for task, value in rows}
