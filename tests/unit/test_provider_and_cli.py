"""The package is an Airflow provider and ships the `posttrain` command."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

from tests.conftest import REPO


def test_provider_entry_point_returns_provider_info() -> None:
    [ep] = [e for e in entry_points(group="apache_airflow_provider") if e.value.startswith("posttrain")]
    info = ep.load()()
    assert info["package-name"] == "airflow-provider-posttrain"
    assert info["connection-types"] == [{"connection-type": "ray", "hook-class-name": "posttrain.hooks.ray.RayJobHook"}]
    for group in ("operators", "hooks", "triggers"):
        for module in info[group][0]["python-modules"]:
            __import__(module)


def test_render_prints_the_task_graph() -> None:
    out = subprocess.run([sys.executable, "-m", "posttrain", "render", str(REPO / "dags/recipes/tiny-sft.yaml")],
                         capture_output=True, text=True, check=True).stdout
    assert "DAG posttrain__tiny-sft" in out
    assert "ray_cluster (setup) [RayClusterOperator]" in out
    assert "ray_cluster_teardown (teardown) [RayClusterTeardownOperator]" in out
    assert '"max_steps": 30' in out


def test_tiny_model_command_is_idempotent(tiny_model: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "posttrain", "tiny-model", str(tiny_model)],
                         capture_output=True, text=True, check=True).stdout
    assert "already holds a model" in out
