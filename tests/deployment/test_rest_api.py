"""The tiny SFT recipe through the real deployment, driven through the REST API as the UI drives it:
a trigger with a conf, every task's state and log, the Ray job's lines in the train log, the extra
links, and nothing of the run's Ray head left afterwards."""

from __future__ import annotations

import json
import re
from typing import Any

import psutil
import pytest

from posttrain.hooks.local_ray import LocalRayCluster
from posttrain.paths import run_workspace, safe_name
from posttrain.uris import local_path
from tests.deployment.conftest import SFT_DAG, Deployment, descendants, run_path

pytestmark = [pytest.mark.slow, pytest.mark.deployment]

TASKS = ("resolve_recipe", "validate_data", "prepare_data", "ray_cluster", "train", "evaluate", "promote",
         "ray_cluster_teardown", "report")


def test_components_listen_on_loopback_only(deployment: Deployment) -> None:
    postmaster = deployment.postgres.postmaster()
    assert postmaster is not None
    roots = [proc.pid for proc in deployment.procs.values()] + [postmaster]
    pids = {p.pid for root in roots for p in descendants(root)}
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert {c.laddr.port for c in listening} >= {deployment.port, deployment.postgres.port}
    assert {c.laddr.ip for c in listening} <= {"127.0.0.1", "::1"}, listening


def test_an_out_of_bounds_conf_is_refused_and_starts_nothing(deployment: Deployment) -> None:
    before = deployment.api("GET", f"/dags/{SFT_DAG}/dagRuns")["total_entries"]
    response = deployment.client.post(f"/dags/{SFT_DAG}/dagRuns",
                                      json={"logical_date": None, "conf": {"learning_rate": 5}})
    assert response.status_code == 400, response.text
    assert "learning_rate" in response.text and "maximum" in response.text
    assert deployment.api("GET", f"/dags/{SFT_DAG}/dagRuns")["total_entries"] == before


def test_tiny_sft_runs_through_the_deployment(deployment: Deployment, sft_run: dict[str, Any]) -> None:
    run_id = sft_run["run_id"]
    states = deployment.task_states(SFT_DAG, run_id)
    assert states == dict.fromkeys(TASKS, "success"), states
    assert sft_run["run"]["state"] == "success" and sft_run["run"]["conf"] == sft_run["conf"]

    # The conf reached the recipe the run trained with.
    ws = local_path(run_workspace(str(deployment.storage), "tiny-sft", run_id))
    resolved = json.loads((ws / "recipe.json").read_text())
    assert resolved["training"]["max_steps"] == 5 and resolved["training"]["learning_rate"] == 2e-3

    # Every task's log is readable through the API; the train task's holds the Ray job's lines.
    logs = {task: deployment.task_log(SFT_DAG, run_id, task) for task in TASKS}
    assert all(logs.values()), [task for task, text in logs.items() if not text]
    steps = re.findall(r"step (\d+)/5 loss \d+\.\d+", logs["train"])
    # Each step's line once, in order (Ray Train's print patch would double each one).
    assert list(map(int, steps)) == [1, 2, 3, 4, 5], logs["train"][-3000:]
    # One Ray cluster of several on the machine: its processes find their own ("auto" may not).
    assert "Found multiple active Ray instances" not in logs["train"]
    assert "posttrain train finished" in logs["train"]

    # The extra links resolve: the run's Ray dashboard and the train job's page on it.
    cluster = json.loads((ws / "cluster.json").read_text())
    dashboard = cluster["dashboard_url"]
    links = {task: deployment.api("GET", f"{run_path(SFT_DAG, run_id)}/taskInstances/{task}/links")["extra_links"]
             for task in ("ray_cluster", "train", "evaluate")}
    job_id = safe_name(f"posttrain-{SFT_DAG}-{run_id}-train-try1")
    assert links["ray_cluster"] == {"Ray dashboard": dashboard}
    # (no MLflow UI serves this deployment's local tracking store: its link has no URL)
    assert links["train"] == {"Ray dashboard": f"{dashboard}/#/jobs/{job_id}", "MLflow run": None}
    assert links["evaluate"]["Ray dashboard"].startswith(f"{dashboard}/#/jobs/")
    assert dashboard.startswith("http://127.0.0.1:")

    # The teardown stopped the run's Ray head: not one of its processes is left.
    assert LocalRayCluster.processes(cluster) == []
