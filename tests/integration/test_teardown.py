"""The cluster is torn down even when training fails, and the task fails with the job's error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from posttrain.hooks.local_ray import LocalRayCluster
from tests.conftest import run_dag_file, run_recipe, task_states, workspace_of, write_recipe


@pytest.mark.usefixtures("airflow_db")
def test_training_failure_still_tears_the_head_down(tmp_path: Path, tiny_model: Path, capfd) -> None:
    # A model folder with the tokenizer but no weights: data preparation works, training cannot.
    broken = tmp_path / "no-weights"
    broken.mkdir()
    for f in tiny_model.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            shutil.copy(f, broken)
    recipe = write_recipe(tmp_path, name="train-fails", model={"base": str(broken)})
    run = run_recipe(recipe)
    states = task_states(run)
    assert states["prepare_data"] == "success" and states["ray_cluster"] == "success"
    assert states["train"] == "failed"
    assert states["evaluate"] == "upstream_failed" and states["promote"] == "upstream_failed"
    assert states["ray_cluster_teardown"] == "success"
    assert str(run.state) == "failed"
    cluster = json.loads((workspace_of(recipe, run) / "cluster.json").read_text())
    assert LocalRayCluster.processes(cluster) == []
    # The extra links the task pages show: the dashboard, and the failed job's page on it.
    links = link_xcoms(run)
    assert links["ray_cluster"] == cluster["dashboard_url"]
    assert links["train"].startswith(f"{cluster['dashboard_url']}/#/jobs/posttrain-posttrain__train-fails-")
    assert links["train"].endswith("-train-try1")
    assert not Path(cluster["temp_dir"]).exists()
    out = capfd.readouterr()
    text = out.out + out.err
    assert "Ray job posttrain-posttrain__train-fails" in text and "FAILED" in text
    assert "--- last lines of the job log ---" in text and "config.json" in text


@pytest.mark.usefixtures("airflow_db")
def test_teardown_finds_the_head_without_the_workspace(tmp_path: Path) -> None:
    """The setup task's XCom is enough: a head is stopped even if the run workspace was deleted."""
    info = LocalRayCluster.start(num_cpus=1)
    try:
        source = ("from datetime import datetime\nfrom airflow.sdk import DAG\n"
                  "from posttrain.operators.ray_cluster import RayClusterTeardownOperator\n"
                  "with DAG('teardown_only', schedule=None, start_date=datetime(2024, 1, 1)) as dag:\n"
                  f"    RayClusterTeardownOperator(task_id='down', workspace={str(tmp_path / 'gone')!r}, "
                  f"cluster={info!r})\n")
        run = run_dag_file(source, "teardown_only")
        assert task_states(run)["down"] == "success"
        assert LocalRayCluster.processes(info) == []
    finally:
        LocalRayCluster.stop(info)


def link_xcoms(run) -> dict[str, str]:  # noqa: ANN001
    from types import SimpleNamespace

    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from posttrain.links import RayDashboardLink

    with create_session() as session:
        rows = session.execute(select(XComModel.task_id, XComModel.value).where(
            XComModel.dag_id == run.dag_id, XComModel.run_id == run.run_id,
            XComModel.key == RayDashboardLink().xcom_key)).all()
    return {task: XComModel.deserialize_value(SimpleNamespace(value=value)) for task, value in rows}
