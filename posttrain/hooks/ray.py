"""The Ray Jobs REST API and the waiting on it.

`RayJobHook` talks HTTP to a cluster's dashboard (submit, status, logs, stop, wait), so an Airflow
worker needs no `ray` package to run a job on a remote cluster. `RayClusterRef` is where a run's
cluster is, as its setup task reported it. The local Ray head lives in `posttrain.hooks.local_ray`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from airflow.sdk import BaseHook

TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
LOG_TAIL_LINES = 40


def job_outcome(job_id: str, job: dict, logs: str) -> dict[str, Any]:
    """What a finished job reports to its task: status, message and the last lines of its log."""
    return {"status": job["status"], "job_id": job_id, "message": job.get("message") or "",
            "log_tail": "\n".join(logs.splitlines()[-LOG_TAIL_LINES:])}


class RayJobError(RuntimeError):
    pass


class RayJobTimeout(RayJobError):
    pass


class JobWatch:
    """What one look at a job does, for the hook's blocking wait and the trigger's async loop alike:
    hand each log line not seen before to `on_log`, and give the outcome once the job is over."""

    def __init__(self, job_id: str, on_log: Callable[[str], None]):
        self.job_id = job_id
        self.on_log = on_log
        self.seen = 0  # characters of the log already handed on

    def update(self, job: dict, logs: str) -> dict[str, Any] | None:
        """The job's outcome when it is in a terminal state, else None."""
        for line in logs[self.seen:].splitlines():
            self.on_log(line)
        self.seen = len(logs)
        return job_outcome(self.job_id, job, logs) if job.get("status") in TERMINAL_STATES else None


class RayJobHook(BaseHook):
    """Client of one cluster's Ray Jobs API. `address` (the dashboard URL) wins over the connection."""

    conn_name_attr = "ray_conn_id"
    default_conn_name = "ray_default"
    conn_type = "ray"
    hook_name = "Ray"

    def __init__(self, address: str | None = None, ray_conn_id: str = default_conn_name, timeout: float = 30.0,
                 token_file: str | None = None):
        super().__init__()
        self.ray_conn_id = ray_conn_id
        self._address = address
        self.token_file = token_file
        self.timeout = timeout

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["schema", "login", "extra", "port"],
            "relabeling": {"host": "Dashboard URL (http://head:8265)", "password": "Auth token"},
            "placeholders": {"host": "http://127.0.0.1:8265", "password": "optional Ray auth token"},
        }

    def _endpoint(self) -> tuple[str, dict[str, str]]:
        if self._address:
            token = Path(self.token_file).read_text().strip() if self.token_file else None
            return self._address.rstrip("/"), {"Authorization": f"Bearer {token}"} if token else {}
        conn = self.get_connection(self.ray_conn_id)
        host = conn.host or ""
        if "://" not in host:
            host = f"http://{host}:{conn.port or 8265}"
        headers = {"Authorization": f"Bearer {conn.password}"} if conn.password else {}
        return host.rstrip("/"), headers

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        base, headers = self._endpoint()
        with httpx.Client(base_url=base, headers=headers, timeout=self.timeout) as client:
            response = client.request(method, path, **kwargs)
        if response.status_code != 200:
            raise RayJobError(f"{method} {base}{path}: HTTP {response.status_code}: {response.text[:500]}")
        return response.json()

    def submit_job(self, entrypoint: str, submission_id: str, runtime_env: dict | None = None,
                   metadata: dict[str, str] | None = None, entrypoint_num_cpus: float | None = None) -> str:
        body: dict[str, Any] = {"entrypoint": entrypoint, "submission_id": submission_id,
                                "runtime_env": runtime_env or {}, "metadata": metadata or {}}
        if entrypoint_num_cpus is not None:
            body["entrypoint_num_cpus"] = entrypoint_num_cpus
        return self._request("POST", "/api/jobs/", json=body)["submission_id"]

    def get_job(self, job_id: str) -> dict | None:
        """The job's details, or None when the cluster has no job of that id."""
        try:
            return self._request("GET", f"/api/jobs/{job_id}")
        except RayJobError as exc:
            if "HTTP 404" in str(exc):
                return None
            raise

    def get_job_logs(self, job_id: str) -> str:
        return self._request("GET", f"/api/jobs/{job_id}/logs").get("logs", "")

    def stop_job(self, job_id: str) -> bool:
        return bool(self._request("POST", f"/api/jobs/{job_id}/stop").get("stopped"))

    async def async_job_and_logs(self, job_id: str) -> tuple[dict, str]:
        """Status and full log in one round trip pair, without blocking the triggerer's loop."""
        base, headers = self._endpoint()
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=self.timeout) as client:
            job = await client.get(f"/api/jobs/{job_id}")
            logs = await client.get(f"/api/jobs/{job_id}/logs")
        if job.status_code != 200:
            raise RayJobError(f"GET {base}/api/jobs/{job_id}: HTTP {job.status_code}: {job.text[:500]}")
        return job.json(), logs.json().get("logs", "") if logs.status_code == 200 else ""

    def wait_ready(self, timeout: float) -> None:
        """Until the Jobs API answers, at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._request("GET", "/api/version")
                return
            except (httpx.HTTPError, RayJobError) as exc:
                if time.monotonic() > deadline:
                    raise RayJobError(f"the Ray Jobs API did not answer within {timeout:.0f}s: {exc}") from exc
                time.sleep(1.0)

    def wait_for_job(self, job_id: str, timeout: float, on_log: Callable[[str], None],
                     poll_interval: float = 2.0) -> dict[str, Any]:
        """Until the job is over, handing each new log line to `on_log`; returns `job_outcome(...)`.
        A job still running after `timeout` seconds is stopped (nobody would be watching it)."""
        deadline, watch = time.monotonic() + timeout, JobWatch(job_id, on_log)
        while True:
            job = self.get_job(job_id)
            if job is None:
                raise RayJobError(f"the Ray cluster has no job {job_id}")
            if (outcome := watch.update(job, self.get_job_logs(job_id))) is not None:
                return outcome
            if time.monotonic() > deadline:
                self.stop_job(job_id)
                raise RayJobTimeout(f"Ray job {job_id} did not finish within {timeout:.0f}s; stopped it")
            time.sleep(poll_interval)

    def alive_nodes(self) -> int:
        """Nodes the cluster reports alive (the dashboard's node summary)."""
        data = self._request("GET", "/nodes?view=summary")
        return sum(1 for node in data.get("data", {}).get("summary", [])
                   if (node.get("raylet") or {}).get("state", "ALIVE") == "ALIVE")

    def wait_nodes(self, expected: int, timeout: float) -> None:
        """Until the cluster has `expected` alive nodes, at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        seen: int | str = "no answer"
        while True:
            try:
                seen = self.alive_nodes()
                if seen >= expected:
                    return
            except (httpx.HTTPError, RayJobError) as exc:
                seen = f"no answer ({type(exc).__name__})"
            if time.monotonic() > deadline:
                raise RayJobError(f"the Ray cluster at {self._endpoint()[0]} did not report {expected} alive nodes "
                                  f"within {timeout:.0f} s (last: {seen})")
            time.sleep(2.0)


@dataclass(frozen=True)
class RayClusterRef:
    """Where a run's cluster is: built from the info the setup task returns, it is the one source of
    the hook an operator calls and of the trigger it defers to."""

    dashboard_url: str | None = None
    ray_conn_id: str = RayJobHook.default_conn_name
    token_file: str | None = None
    python: str = "python"  # the interpreter jobs run with on the cluster

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> RayClusterRef:
        return cls(dashboard_url=info.get("dashboard_url"),
                   ray_conn_id=info.get("ray_conn_id", RayJobHook.default_conn_name),
                   token_file=info.get("token_file"), python=info.get("python", "python"))

    def hook(self) -> RayJobHook:
        return RayJobHook(address=self.dashboard_url, ray_conn_id=self.ray_conn_id, token_file=self.token_file)

    def trigger_kwargs(self) -> dict[str, Any]:
        """RayJobTrigger's cluster arguments (the caller adds job_id and poll_interval)."""
        return {"address": self.dashboard_url, "ray_conn_id": self.ray_conn_id, "token_file": self.token_file}

    def job_url(self, job_id: str) -> str | None:
        """The job's page on the dashboard, when the cluster's dashboard URL is known."""
        return f"{self.dashboard_url.rstrip('/')}/#/jobs/{job_id}" if self.dashboard_url else None
