"""What a user does in the UI never leaves a Ray job running. On an existing cluster
(`compute.provider: ray`, where a job would outlive the run's teardown), "Mark as failed" on the
deferred train task, on its whole run, and "Clear" on it must each stop its job within 30 s and
leave the cluster as it was.

Prints the "nothing left running" matrix: row, provider, seconds until the job stopped, jobs left."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import httpx
import pytest

from posttrain.hooks.local_ray import LocalRayCluster
from posttrain.hooks.ray import TERMINAL_STATES, RayJobHook
from posttrain.paths import safe_name
from tests.deployment.conftest import RAY_DAG, Deployment, report, run_path

pytestmark = [pytest.mark.slow, pytest.mark.deployment]
STOP_WITHIN_S = 30


class JobKeptRunning(AssertionError):
    pass


def head_processes(info: dict[str, Any]) -> set[int]:
    """The cluster's own processes (GCS, raylet, dashboard, ...), not the workers jobs come and go with."""
    pids = set()
    for proc in LocalRayCluster.processes(info):
        try:
            cmdline = proc.cmdline()
        except Exception:
            continue
        if cmdline and not cmdline[0].startswith("ray::") and "default_worker.py" not in " ".join(cmdline):
            pids.add(proc.pid)
    return pids


def running_jobs(info: dict[str, Any]) -> list[str]:
    token = open(info["token_file"]).read().strip()
    jobs = httpx.get(f"{info['dashboard_url']}/api/jobs/", headers={"Authorization": f"Bearer {token}"},
                     timeout=30).json()
    return [job["submission_id"] for job in jobs if job["status"] not in TERMINAL_STATES]


def wait_job(hook: RayJobHook, job_id: str, done: Any, timeout: float) -> str | None:
    """The job's status once `done(status)` holds, or its last status after `timeout` seconds."""
    deadline, status = time.monotonic() + timeout, None
    while True:
        job = hook.get_job(job_id)
        status = job["status"] if job else None
        if done(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def mark_task_failed(deployment: Deployment, run_id: str) -> None:
    deployment.api("PATCH", f"{run_path(RAY_DAG, run_id)}/taskInstances/train", json={"new_state": "failed"})


def mark_run_failed(deployment: Deployment, run_id: str) -> None:
    deployment.api("PATCH", run_path(RAY_DAG, run_id), json={"state": "failed"})


def clear_task(deployment: Deployment, run_id: str) -> None:
    deployment.api("POST", f"/dags/{RAY_DAG}/clearTaskInstances", json={
        "dry_run": False, "task_ids": ["train"], "dag_run_id": run_id, "only_failed": False,
        "include_downstream": False, "include_upstream": False})


# (row, the UI action, whether the run then goes on with a new try of train)
ACTIONS = [("mark train failed while deferred", mark_task_failed, False),
           ("mark the whole run failed", mark_run_failed, False),
           ("clear train while deferred", clear_task, True)]
_printed_header: list[bool] = []


@pytest.mark.parametrize(("row", "action", "retried"), ACTIONS, ids=[a[0].replace(" ", "-") for a in ACTIONS])
def test_a_ui_action_on_a_deferred_train_task_stops_its_job(deployment: Deployment, existing_ray: dict[str, Any],
                                                            pytestconfig: pytest.Config, row: str, action: Any,
                                                            retried: bool) -> None:
    hook = RayJobHook(address=existing_ray["dashboard_url"], token_file=existing_ray["token_file"])
    heads = head_processes(existing_ray)
    assert heads and running_jobs(existing_ray) == []

    run_id = deployment.trigger(RAY_DAG, {})
    job_id = safe_name(f"posttrain-{RAY_DAG}-{run_id}-train-try1")
    try:
        state = deployment.wait_for_task(RAY_DAG, run_id, "train", ("deferred", "success", "failed", "upstream_failed"),
                                         timeout=600)
        assert state == "deferred", deployment.task_states(RAY_DAG, run_id)
        # The trainer is really at work: its job runs and has logged a step.
        assert wait_job(hook, job_id, lambda s: s == "RUNNING", timeout=120) == "RUNNING"
        deadline = time.monotonic() + 180
        while "step 1/" not in hook.get_job_logs(job_id):
            assert time.monotonic() < deadline, hook.get_job_logs(job_id)[-3000:]
            time.sleep(1)

        action(deployment, run_id)  # what the UI's button sends
        marked = time.monotonic()
        status = wait_job(hook, job_id, lambda s: s in TERMINAL_STATES, timeout=STOP_WITHIN_S)
        seconds = time.monotonic() - marked
        if retried:  # the cleared task runs again: a new try with a new job; ending the run stops it too
            retry = safe_name(f"posttrain-{RAY_DAG}-{run_id}-train-try2")
            assert wait_job(hook, retry, lambda s: s == "RUNNING", timeout=300) == "RUNNING"
            assert deployment.wait_for_task(RAY_DAG, run_id, "train", ("deferred",), timeout=120) == "deferred"
            mark_run_failed(deployment, run_id)
            assert wait_job(hook, retry, lambda s: s in TERMINAL_STATES, timeout=STOP_WITHIN_S) == "STOPPED"
        deployment.wait_for_run(RAY_DAG, run_id, timeout=300)
        left = running_jobs(existing_ray)
        stopped = f"{seconds:.1f} s" if status == "STOPPED" else f"not ({status})"
        if not _printed_header:
            _printed_header.append(True)
            report(pytestconfig, f"\n{'row':<45} {'provider':<9} {'stopped after':>14} {'jobs left':>9}")
        report(pytestconfig, f"{row:<45} {'ray':<9} {stopped:>14} {len(left):>9}")
        if status not in TERMINAL_STATES:
            raise JobKeptRunning(f"Ray job {job_id} still {status} {STOP_WITHIN_S}s after: {row}")
        assert status == "STOPPED" and left == []
        states = deployment.task_states(RAY_DAG, run_id)
        assert states["ray_cluster_teardown"] == "success", states
    finally:
        # Never leave a job to the rest of the session, whatever the outcome above.
        for job in (job_id, safe_name(f"posttrain-{RAY_DAG}-{run_id}-train-try2")):
            if (found := hook.get_job(job)) is not None and found["status"] not in TERMINAL_STATES:
                hook.stop_job(job)
                wait_job(hook, job, lambda s: s in TERMINAL_STATES, timeout=60)
        with contextlib.suppress(AssertionError):  # reported by the checks above when it matters
            deployment.wait_for_run(RAY_DAG, run_id, timeout=300)

    # The cluster is left as it was: its own processes all still there, its node alive, no job running.
    assert heads <= head_processes(existing_ray)
    assert hook.alive_nodes() == 1 and running_jobs(existing_ray) == []
