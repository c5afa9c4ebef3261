"""Whatever ends a train task never leaves its Ray job running. On an existing cluster
(`compute.provider: ray`, where a job would outlive the run's teardown), each row below must stop
the job within 30 s and leave the cluster as it was; on a local head (`compute.provider: local`)
the run's own cluster must be gone too.

Rows: "Mark as failed" on the train task while deferred and while it runs non-deferred, on the
whole run, "Clear" on the deferred train task (its next try is stopped with the run), the execution
timeout of a non-deferred task, the deferral timeout of a deferred one, and a dashboard that answers
503 past the recipe's retry window and then comes back.

Prints the "nothing left running" matrix: row, provider, seconds until the job stopped, jobs left."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import pytest

from posttrain.hooks.ec2 import Ec2ClusterHook, cluster_id_for
from posttrain.hooks.local_ray import LocalRayCluster
from posttrain.hooks.ray import TERMINAL_STATES, RayClusterRef, RayJobHook, read_token
from posttrain.paths import safe_name
from posttrain.uris import local_path
from tests.deployment.conftest import (
    EC2_DAG,
    JOB_TIMEOUT_S,
    RAY_DAG,
    Deployment,
    FlakyProxy,
    report,
    run_path,
)

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


def job_status(hook: RayJobHook, job_id: str) -> str | None:
    """The job's status; "GONE" once its cluster is no more (a local head torn down: its token
    file removed, its dashboard not answering)."""
    try:
        job = hook.get_job(job_id)
    except (httpx.TransportError, FileNotFoundError):
        return "GONE"
    return job["status"] if job else None


def wait_job(hook: RayJobHook, job_id: str, done: Callable[[str | None], bool], timeout: float) -> str | None:
    """The job's status once `done(status)` holds, or its last status after `timeout` seconds."""
    deadline, status = time.monotonic() + timeout, None
    while True:
        status = job_status(hook, job_id)
        if done(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def over(status: str | None) -> bool:
    return status in TERMINAL_STATES or status == "GONE"


# -- what each row does, once the train task is at work; returns when (time.time()) the job's stop
#    is due from: right after a user's action, when a timeout expires, when the dashboard is back.

def mark_task_failed(deployment: Deployment, dag: str, run_id: str, _proxy: FlakyProxy) -> float:
    deployment.api("PATCH", f"{run_path(dag, run_id)}/taskInstances/train", json={"new_state": "failed"})
    return time.time()


def mark_run_failed(deployment: Deployment, dag: str, run_id: str, _proxy: FlakyProxy | None = None) -> float:
    deployment.api("PATCH", run_path(dag, run_id), json={"state": "failed"})
    return time.time()


def clear_task(deployment: Deployment, dag: str, run_id: str, _proxy: FlakyProxy) -> float:
    deployment.api("POST", f"/dags/{dag}/clearTaskInstances", json={
        "dry_run": False, "task_ids": ["train"], "dag_run_id": run_id, "only_failed": False,
        "include_downstream": False, "include_upstream": False})
    return time.time()


def let_the_timeout_expire(deployment: Deployment, dag: str, run_id: str, _proxy: FlakyProxy) -> float:
    """Nothing to do: the job is stopped when JOB_TIMEOUT_S have passed since the task started (its
    deferral starts a little later, so this measures on the safe side)."""
    started = deployment.task_instances(dag, run_id)["train"]["start_date"]
    return datetime.fromisoformat(started.replace("Z", "+00:00")).timestamp() + JOB_TIMEOUT_S


def break_the_dashboard(deployment: Deployment, dag: str, run_id: str, proxy: FlakyProxy) -> float:
    """503s (and dropped streams) until the trigger gives up after its retry window; then the
    dashboard answers again and the failing task must stop the job."""
    proxy.fail(True)
    try:
        deployment.wait_for_task(dag, run_id, "train", ("scheduled", "queued", "running", "failed", "up_for_retry"),
                                 timeout=120)
    finally:
        proxy.fail(False)
    assert proxy.refused > 0
    return time.time()


@dataclass(frozen=True)
class Row:
    name: str
    dag: str
    provider: str
    waits: str  # the train task's state when the action comes: deferred or running
    action: Callable[[Deployment, str, str, FlakyProxy], float]
    retried: bool = False  # the run goes on with a new try of train
    train_state: str | None = None  # the train task's state at the end, when the row fixes it


ROWS = [
    Row("mark train failed while deferred", RAY_DAG, "ray", "deferred", mark_task_failed),
    Row("mark train failed while running (not deferred)", "posttrain__tiny-sft-ray-blocking", "ray", "running",
        mark_task_failed),
    Row("mark the whole run failed", RAY_DAG, "ray", "deferred", mark_run_failed),
    Row("clear train while deferred", RAY_DAG, "ray", "deferred", clear_task, retried=True),
    Row("execution timeout expires (not deferred)", "posttrain__tiny-sft-ray-blocking-timeout", "ray", "running",
        let_the_timeout_expire, train_state="failed"),
    Row("deferral timeout expires", "posttrain__tiny-sft-ray-deferred-timeout", "ray", "deferred",
        let_the_timeout_expire, train_state="failed"),
    Row("dashboard 503s past the retry window", "posttrain__tiny-sft-ray-flaky", "ray", "deferred",
        break_the_dashboard, train_state="failed"),
    Row("mark train failed while deferred", "posttrain__tiny-sft-local-long", "local", "deferred",
        mark_task_failed),
    Row("mark train failed while deferred", EC2_DAG, "ec2", "deferred", mark_task_failed),
]
_printed_header: list[bool] = []


def cluster_of(deployment: Deployment, dag: str, run_id: str, existing: dict[str, Any]) -> dict[str, Any]:
    """The run's cluster as its setup task reported it (a local head, EC2 instances), or the existing one."""
    if dag.endswith(("-local-long", "-ec2-long")):
        path = f"{run_path(dag, run_id)}/taskInstances/ray_cluster/xcomEntries/return_value"
        value = deployment.api("GET", path, params={"deserialize": "true", "stringify": "false"})["value"]
        return json.loads(value) if isinstance(value, str) else value
    return existing


def cluster_hook(cluster: dict[str, Any]) -> RayJobHook:
    """The cluster as the run's tasks reach it: an existing one by its token file; a run's own with
    the token its setup task put in the run's storage, read now (the teardown deletes it)."""
    if "token_file" in cluster:
        return RayJobHook(address=cluster["dashboard_url"], token_file=cluster["token_file"])
    ref = RayClusterRef.from_info(cluster)
    assert ref.token_uri and ref.token_uri.endswith("/secrets/ray-token"), cluster
    return RayJobHook(address=ref.dashboard_url, token=read_token(ref.token_uri, ref.storage_conn_id))


def what_is_left_of(cluster: dict[str, Any], hook: RayJobHook, dag: str, run_id: str) -> list[str]:
    """What is left of a run's own cluster after its run: a local head's processes, EC2 instances
    still running (and the jobs on the stand-in Ray cluster those instances would run), the token."""
    left = [f"token {cluster['token_uri']}"] if local_path(cluster["token_uri"]).exists() else []
    if cluster["provider"] == "local":
        return left + [f"pid {p.pid}" for p in LocalRayCluster.processes(cluster)]
    if cluster["provider"] == "ec2":
        instances = Ec2ClusterHook("aws_moto", "us-east-1").instances(cluster_id_for(dag, run_id))
        return left + [f"instance {i['InstanceId']}" for i in instances] + [f"job {j}" for j in hook.running_jobs()]
    return left


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.provider}-{r.name.replace(' ', '-')}" for r in ROWS])
def test_nothing_a_task_ends_with_leaves_its_job_running(deployment: Deployment, existing_ray: dict[str, Any],
                                                         flaky_dashboard: FlakyProxy, pytestconfig: pytest.Config,
                                                         row: Row) -> None:
    existing = RayJobHook(address=existing_ray["dashboard_url"], token_file=existing_ray["token_file"])
    heads = head_processes(existing_ray)
    assert heads and running_jobs(existing_ray) == []

    run_id = deployment.trigger(row.dag, {})
    job_id = safe_name(f"posttrain-{row.dag}-{run_id}-train-try1")
    retry = safe_name(f"posttrain-{row.dag}-{run_id}-train-try2")
    hook = existing
    try:
        state = deployment.wait_for_task(row.dag, run_id, "train", (row.waits, "success", "failed", "upstream_failed"),
                                         timeout=600)
        assert state == row.waits, deployment.task_states(row.dag, run_id)
        cluster = cluster_of(deployment, row.dag, run_id, existing_ray)
        hook = cluster_hook(cluster)
        # The trainer is really at work: its job runs and has logged a step.
        assert wait_job(hook, job_id, lambda s: s == "RUNNING", timeout=120) == "RUNNING"
        deadline = time.monotonic() + 180
        while row.action is not let_the_timeout_expire and "step 1/" not in hook.get_job_logs(job_id):
            assert time.monotonic() < deadline, hook.get_job_logs(job_id)[-3000:]
            time.sleep(1)

        due = row.action(deployment, row.dag, run_id, flaky_dashboard)
        status = wait_job(hook, job_id, over, timeout=max(0.0, due - time.time()) + STOP_WITHIN_S)
        seconds = time.time() - due
        if row.retried:  # the cleared task runs again: a new try with a new job; ending the run stops it too
            assert wait_job(hook, retry, lambda s: s == "RUNNING", timeout=300) == "RUNNING"
            assert deployment.wait_for_task(row.dag, run_id, "train", (row.waits,), timeout=120) == row.waits
            mark_run_failed(deployment, row.dag, run_id)
            assert wait_job(hook, retry, over, timeout=STOP_WITHIN_S) == "STOPPED"
        deployment.wait_for_run(row.dag, run_id, timeout=300)
        left = running_jobs(existing_ray)
        if cluster is not existing_ray:
            left += what_is_left_of(cluster, hook, row.dag, run_id)
        stopped = f"{seconds:.1f} s" if status in ("STOPPED", "GONE") else f"not ({status})"
        if not _printed_header:
            _printed_header.append(True)
            report(pytestconfig, f"\n{'row':<48} {'provider':<9} {'stopped after':>14} {'jobs left':>9}")
        report(pytestconfig, f"{row.name:<48} {row.provider:<9} {stopped:>14} {len(left):>9}")
        if not over(status):
            raise JobKeptRunning(f"Ray job {job_id} still {status} {STOP_WITHIN_S}s after: {row.name}")
        assert status in ("STOPPED", "GONE") and left == [], (status, left)
        states = deployment.task_states(row.dag, run_id)
        assert states["ray_cluster_teardown"] == "success", states
        if row.train_state:
            assert states["train"] == row.train_state, states
    finally:
        # Never leave a job to the rest of the session, whatever the outcome above.
        for job in (job_id, retry):
            if job_status(hook, job) not in (*TERMINAL_STATES, "GONE", None):
                hook.stop_job(job)
                wait_job(hook, job, over, timeout=60)
        with contextlib.suppress(AssertionError):  # reported by the checks above when it matters
            deployment.wait_for_run(row.dag, run_id, timeout=300)

    # The existing cluster is left as it was: its own processes all there, its node alive, no job running.
    assert heads <= head_processes(existing_ray)
    assert existing.alive_nodes() == 1 and running_jobs(existing_ray) == []
