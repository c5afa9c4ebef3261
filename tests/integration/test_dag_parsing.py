"""Recipes → DAGs: one per recipe, bad recipes isolated, nothing heavy imported at parse time,
and the three ways a run starts (schedule, upstream assets, manual trigger with params)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, write_recipe

HEAVY = ("torch", "ray", "transformers", "vllm", "peft", "great_expectations", "mlflow", "matplotlib")


def dags_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "dags"
    (folder / "recipes").mkdir(parents=True)
    shutil.copy(REPO / "dags" / "posttrain_dags.py", folder)
    return folder


def parse(folder: Path):
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(folder))


def test_the_repo_dags_folder_loads_without_errors() -> None:
    bag = parse(REPO / "dags")
    assert not bag.import_errors
    assert "posttrain__tiny-sft" in bag.dag_ids


def test_bad_recipe_is_an_import_error_and_the_others_still_load(tmp_path: Path) -> None:
    folder = dags_folder(tmp_path)
    write_recipe(folder / "recipes", name="good-one")
    write_recipe(folder / "recipes", name="bad-one", model={"base": "m", "lora": {"rank": 0}})
    (folder / "recipes" / "notes.txt").write_text("not a recipe")
    bag = parse(folder)
    assert "posttrain__good-one" in bag.dag_ids
    assert "posttrain__bad-one" not in bag.dag_ids
    [(file, message)] = bag.import_errors.items()
    assert file.endswith("posttrain_dags.py")
    assert f"{folder}/recipes/bad-one.yaml: model.lora.rank: Input should be greater than 0" in message
    assert "good-one" not in message


def test_parsing_imports_no_heavy_module(tmp_path: Path) -> None:
    folder = dags_folder(tmp_path)
    for i in range(3):
        write_recipe(folder / "recipes", name=f"r{i}")
    code = ("import sys, json\nfrom airflow.dag_processing.dagbag import DagBag\n"
            f"bag = DagBag(dag_folder={str(folder)!r})\n"
            f"print(json.dumps([sorted(bag.dag_ids), [m for m in {HEAVY!r} if m in sys.modules]]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    dag_ids, heavy = json.loads(out.strip().splitlines()[-1])
    assert dag_ids == ["posttrain__r0", "posttrain__r1", "posttrain__r2"]
    assert heavy == []


def test_task_graph_setup_and_teardown(tmp_path: Path) -> None:
    from posttrain.dags.factory import build_dag
    from posttrain.recipe import load_recipe

    path = write_recipe(tmp_path)
    dag = build_dag(load_recipe(path), path)
    assert [t.task_id for t in dag.topological_sort()][:4] == ["resolve_recipe", "validate_data", "prepare_data",
                                                              "ray_cluster"]
    assert dag.task_dict["ray_cluster"].is_setup and dag.task_dict["ray_cluster_teardown"].is_teardown
    assert dag.task_dict["train"].deferrable and dag.task_dict["evaluate"].deferrable
    [outlet] = dag.task_dict["promote"].outlets
    assert outlet.uri == f"file://{tmp_path}/storage/t-sft/champion.json"
    # The report comes last, after whatever happened (a teardown without setups: all done, and the
    # run's state is left to the tasks before it).
    report = dag.task_dict["report"]
    assert [t.task_id for t in dag.topological_sort()][-1] == "report" and report.is_teardown
    assert report.upstream_task_ids == {"resolve_recipe", "promote", "ray_cluster_teardown"}
    assert report.trigger_rule == "all_done_setup_success" and not report.on_failure_fail_dagrun


def test_the_approval_gate_sits_between_evaluate_and_promote_only_when_required(tmp_path: Path) -> None:
    from datetime import timedelta

    from airflow.providers.standard.operators.hitl import ApprovalOperator

    from posttrain.dags.factory import build_dag
    from posttrain.recipe import load_recipe

    plain = write_recipe(tmp_path / "plain")
    dag = build_dag(load_recipe(plain), plain)
    assert "approve_promotion" not in dag.task_dict
    # (resolve_recipe is upstream of every task: its output is their workspace)
    assert dag.task_dict["promote"].upstream_task_ids - {"resolve_recipe"} == {"evaluate"}

    gated = write_recipe(tmp_path / "gated", promotion={"approval": "required", "approval_timeout": 45})
    dag = build_dag(load_recipe(gated), gated)
    gate = dag.task_dict["approve_promotion"]
    assert isinstance(gate, ApprovalOperator)
    assert gate.upstream_task_ids - {"resolve_recipe"} == {"evaluate"}
    assert dag.task_dict["promote"].upstream_task_ids - {"resolve_recipe"} == {gate.task_id}
    # The cluster is not held while a person reads: the teardown follows evaluate, not the gate.
    assert "approve_promotion" not in dag.task_dict["ray_cluster_teardown"].upstream_task_ids
    # No answer in time takes Reject; the reviewer can give a reason.
    assert gate.response_timeout == timedelta(seconds=45) and gate.defaults == ["Reject"]
    assert set(gate.params) == {"reason"}


def test_prepare_on_ray_runs_after_validation_on_the_runs_cluster(tmp_path: Path) -> None:
    from posttrain.dags.factory import build_dag
    from posttrain.operators.prepare import RayPrepareDataOperator
    from posttrain.recipe import load_recipe

    path = write_recipe(tmp_path, data={"prepare": "ray"})
    dag = build_dag(load_recipe(path), path)
    assert [t.task_id for t in dag.topological_sort()][:5] == ["resolve_recipe", "validate_data", "ray_cluster",
                                                              "prepare_data", "train"]
    prep = dag.task_dict["prepare_data"]
    assert isinstance(prep, RayPrepareDataOperator) and prep.stage == "prepare"
    assert "ray_cluster" in prep.upstream_task_ids and prep.deferrable


@pytest.mark.parametrize("waiting", [{}, {"deferrable": False, "job_timeout_s": 90, "dashboard_retry_window_s": 7}])
def test_the_recipe_says_how_the_job_stages_wait(tmp_path: Path, waiting: dict) -> None:
    """`airflow:` in the recipe: deferrable or not (default: Airflow's operators.default_deferrable,
    True in these tests), the job timeout as both deferral and execution timeout, the dashboard's
    retry window for the trigger and the blocking wait."""
    from datetime import timedelta

    from posttrain.dags.factory import build_dag
    from posttrain.recipe import DEFAULT_RETRY_WINDOW_S, load_recipe

    path = write_recipe(tmp_path, airflow=waiting)
    dag = build_dag(load_recipe(path), path)
    for stage in ("train", "evaluate"):
        task = dag.task_dict[stage]
        assert task.deferrable is waiting.get("deferrable", True)
        assert task.timeout_s == waiting.get("job_timeout_s", 24 * 3600)
        assert task.execution_timeout == timedelta(seconds=task.timeout_s)
        assert task.retry_window_s == waiting.get("dashboard_retry_window_s", DEFAULT_RETRY_WINDOW_S)


@pytest.mark.parametrize(("schedule", "expression"), [("@weekly", "0 0 * * 0"), ("0 3 * * 1", "0 3 * * 1"),
                                                     (None, None)])
def test_recipe_schedule_is_the_dag_schedule(tmp_path: Path, schedule: str | None, expression: str | None) -> None:
    from posttrain.dags.factory import build_dag
    from posttrain.recipe import load_recipe

    path = write_recipe(tmp_path, schedule=schedule)
    dag = build_dag(load_recipe(path), path)
    assert dag.schedule == schedule
    assert getattr(dag.timetable, "expression", None) == expression
    assert dag.timetable.can_be_scheduled == (schedule is not None)


def test_trigger_on_assets_schedules_on_those_assets(tmp_path: Path) -> None:
    from airflow.sdk import Asset

    from posttrain.dags.factory import build_dag
    from posttrain.recipe import load_recipe

    path = write_recipe(tmp_path, trigger_on_assets=["s3://etl/chat/latest", "file:///data/chat.jsonl"])
    dag = build_dag(load_recipe(path), path)
    condition = dag.timetable.asset_condition
    assert type(condition).__name__ == "AssetAny"  # any one update starts a run
    assert set(condition.objects) == {Asset("s3://etl/chat/latest"), Asset("file:///data/chat.jsonl")}


def test_params_are_typed_bounded_and_default_to_the_recipe(tmp_path: Path) -> None:
    from posttrain.dags.factory import build_dag
    from posttrain.recipe import load_recipe

    path = write_recipe(tmp_path, training={"max_steps": 7, "learning_rate": 0.002})
    dag = build_dag(load_recipe(path), path)
    params = dag.params
    assert set(params) == {"learning_rate", "max_steps", "seed", "train_data", "eval_data", "min_improvement"}
    assert params["max_steps"] == 7 and params["learning_rate"] == 0.002
    lr = params.get_param("learning_rate").schema
    assert lr["type"] == "number" and lr["exclusiveMinimum"] == 0 and lr["maximum"] == 1
    assert params.get_param("max_steps").schema["minimum"] == 1
