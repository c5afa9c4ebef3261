"""The Ray Jobs REST API and the waiting on it.

`RayJobHook` talks HTTP to a cluster's dashboard (submit, status, logs, stop, wait), so an Airflow
worker needs no `ray` package to run a job on a remote cluster. `RayClusterRef` is where a run's
cluster is, as its setup task reported it. The local Ray head lives in `posttrain.hooks.local_ray`.

The cluster's auth token is never passed around: the setup task writes it into the run workspace
(`token_uri`: a 0600 file in a 0700 folder on a local disk, a private object on S3), and whoever
talks to the cluster (the job tasks, their triggers on a triggerer, the teardown) reads it from
there with the storage connection. So no task depends on the disk of the machine the setup ran
on, and the token is in no XCom, trigger kwargs, log line or DAG run conf.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from airflow.sdk import BaseHook

from posttrain.hooks.ray_follow import (
    DEFAULT_RETRY_WINDOW_S,
    LOG_TAIL_LINES,
    TERMINAL_STATES,
    Backoff,
    RayJobError,
    RayJobTimeout,
    async_stop_job,
    follow_job,
    job_outcome,
)

T = TypeVar("T")
__all__ = ["LOG_TAIL_LINES", "TERMINAL_STATES", "RayClusterRef", "RayJobError", "RayJobHook", "RayJobTimeout",
           "job_outcome"]


class RayJobHook(BaseHook):
    """Client of one cluster's Ray Jobs API. `address` (the dashboard URL) wins over the connection."""

    conn_name_attr = "ray_conn_id"
    default_conn_name = "ray_default"
    conn_type = "ray"
    hook_name = "Ray"

    def __init__(self, address: str | None = None, ray_conn_id: str = default_conn_name, timeout: float = 30.0,
                 token_uri: str | None = None, storage_conn_id: str | None = None, token_file: str | None = None,
                 token: str | None = None):
        """`token_uri`: where the cluster's auth token is (a workspace URI read with `storage_conn_id`,
        or a local path); `token_file` is the same for a local path (tests, a head on this machine).
        `token`: the token itself, for the setup task that made it (nothing else holds one)."""
        super().__init__()
        self.ray_conn_id = ray_conn_id
        self._address = address
        self.token_uri = token_uri or token_file
        self.storage_conn_id = storage_conn_id
        self.timeout = timeout
        self._token: str | None = token

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["schema", "login", "extra", "port"],
            "relabeling": {"host": "Dashboard URL (http://head:8265)", "password": "Auth token"},
            "placeholders": {"host": "http://127.0.0.1:8265", "password": "optional Ray auth token"},
        }

    def _endpoint(self) -> tuple[str, dict[str, str]]:
        if self._address:
            if self.token_uri and self._token is None:
                self._token = read_token(self.token_uri, self.storage_conn_id)
            token = self._token
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
            raise RayJobError(f"{method} {base}{path}: HTTP {response.status_code}: {response.text[:500]}",
                              response.status_code)
        return response.json()

    def submit_job(self, entrypoint: str, submission_id: str, runtime_env: dict | None = None,
                   metadata: dict[str, str] | None = None, entrypoint_num_cpus: float | None = None) -> str:
        body: dict[str, Any] = {"entrypoint": entrypoint, "submission_id": submission_id,
                                "runtime_env": runtime_env or {}, "metadata": metadata or {}}
        if entrypoint_num_cpus is not None:
            body["entrypoint_num_cpus"] = entrypoint_num_cpus
        return self._request("POST", "/api/jobs/", json=body)["submission_id"]

    def ensure_submitted(self, entrypoint: str, submission_id: str, retry_window_s: float = DEFAULT_RETRY_WINDOW_S,
                         **kwargs: Any) -> bool:
        """Submit the job unless the cluster has it already; True when this call submitted it. A
        dashboard failing transiently (refused, reset, 5xx: a head whose job agent is not up yet
        answers "No available agent to submit job, please try again later") is asked again with
        backoff for up to `retry_window_s`; asking for the job first makes a retry after a lost
        answer safe (the job is never submitted twice)."""
        def once() -> bool:
            if self.get_job(submission_id) is not None:
                return False
            self.submit_job(entrypoint, submission_id, **kwargs)
            return True

        return self.retrying(once, f"submitting Ray job {submission_id}", retry_window_s)

    def get_job(self, job_id: str) -> dict | None:
        """The job's details, or None when the cluster has no job of that id."""
        try:
            return self._request("GET", f"/api/jobs/{job_id}")
        except RayJobError as exc:
            if exc.status_code == 404:
                return None
            raise

    def get_job_logs(self, job_id: str) -> str:
        return self._request("GET", f"/api/jobs/{job_id}/logs").get("logs", "")

    def stop_job(self, job_id: str) -> bool:
        return bool(self._request("POST", f"/api/jobs/{job_id}/stop").get("stopped"))

    def running_jobs(self, **metadata: str) -> list[str]:
        """Ids of the jobs not yet over whose submission metadata holds every given key and value
        (the operators submit with dag_id, run_id and task_id)."""
        return [job["submission_id"] for job in self._request("GET", "/api/jobs/")
                if job.get("status") not in TERMINAL_STATES and job.get("submission_id")
                and all((job.get("metadata") or {}).get(k) == v for k, v in metadata.items())]

    def stop_if_running(self, job_id: str) -> str | None:
        """Stop the job unless it is over. Returns the status it was in when asked (None: the
        cluster has no such job)."""
        job = self.get_job(job_id)
        if job is None or job["status"] in TERMINAL_STATES:
            return job and job["status"]
        self.stop_job(job_id)
        return job["status"]

    @staticmethod
    def retrying(call: Callable[[], T], what: str, window_s: float) -> T:
        """`call()`, again with backoff while the dashboard fails transiently (refused, reset, 5xx,
        timeouts), for at most `window_s` seconds; other errors raise at once."""
        backoff = Backoff(window_s)
        while True:
            try:
                return call()
            except Exception as exc:
                time.sleep(backoff.delay(exc, what))

    def stop_and_wait(self, job_id: str, timeout: float, poll_interval: float = 1.0) -> str | None:
        """Stop the job unless it is over, and wait (at most `timeout` s) until it is. Returns the
        status it was in when asked (None: the cluster has no such job)."""
        was = self.stop_if_running(job_id)
        if was is None or was in TERMINAL_STATES:
            return was
        deadline = time.monotonic() + timeout
        while (now := self.get_job(job_id)) is not None and now["status"] not in TERMINAL_STATES:
            if time.monotonic() > deadline:
                raise RayJobTimeout(f"Ray job {job_id} was asked to stop but is still {now['status']} "
                                    f"after {timeout:.0f}s")
            time.sleep(poll_interval)
        return was

    async def async_endpoint(self) -> tuple[str, dict[str, str]]:
        """`_endpoint()` off the event loop: reading the token (an S3 GET) or a connection blocks."""
        return await asyncio.to_thread(self._endpoint)

    async def async_stop_job(self, job_id: str) -> bool:
        """Stop the job without blocking the triggerer's loop (no wait for it to be over)."""
        base, headers = await self.async_endpoint()
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=self.timeout) as client:
            return await async_stop_job(client, job_id)

    async def follow_job(self, job_id: str, on_lines: Callable[[list[str]], None],
                         retry_window_s: float = DEFAULT_RETRY_WINDOW_S, poll_interval: float = 2.0,
                         **kwargs: Any) -> dict[str, Any]:
        """Follow the job to its end, each log line handed to `on_lines` once and in order (see
        `posttrain.hooks.ray_follow.follow_job`); returns `job_outcome(...)`."""
        base, headers = await self.async_endpoint()
        return await follow_job(base, headers, job_id, on_lines, retry_window_s=retry_window_s,
                                http_timeout=self.timeout, poll_interval=poll_interval, **kwargs)

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
                     poll_interval: float = 2.0, retry_window_s: float = DEFAULT_RETRY_WINDOW_S) -> dict[str, Any]:
        """Until the job is over, handing each log line to `on_log` once, in order (the trigger's
        follower, run here); returns `job_outcome(...)`. A job still running after `timeout` seconds
        is stopped (nobody would be watching it)."""

        base, headers = self._endpoint()  # outside the loop: reading a connection may block

        def each(lines: list[str]) -> None:
            for line in lines:
                on_log(line)

        async def follow() -> dict[str, Any]:
            return await asyncio.wait_for(follow_job(base, headers, job_id, each, retry_window_s=retry_window_s,
                                                     http_timeout=self.timeout, poll_interval=poll_interval),
                                          timeout)

        try:
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # no loop in this thread (a task's execute): run one here
                return asyncio.run(follow())
            with concurrent.futures.ThreadPoolExecutor(1) as pool:  # inside a loop: follow in a thread
                return pool.submit(asyncio.run, follow()).result()
        except TimeoutError:
            self.stop_job(job_id)
            raise RayJobTimeout(f"Ray job {job_id} did not finish within {timeout:.0f}s; stopped it") from None

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


def read_token(uri: str, storage_conn_id: str | None = None) -> str:
    """The auth token at `uri` (a local path, file:// or a workspace object read with the storage
    connection), registered with Airflow's secrets masker so no log line shows it."""
    if "://" not in uri or uri.startswith("file://"):
        from posttrain.uris import local_path

        token = local_path(uri).read_text().strip()
    else:
        from posttrain.hooks.storage import StorageHook

        token = StorageHook(storage_conn_id).path(uri).read_text().strip()
    if not token:
        raise RayJobError(f"{uri}: the Ray auth token is empty")
    from airflow.sdk.log import mask_secret

    mask_secret(token)
    return token


@dataclass(frozen=True)
class RayClusterRef:
    """Where a run's cluster is: built from the info the setup task returns, it is the one source of
    the hook an operator calls and of the trigger it defers to."""

    dashboard_url: str | None = None
    ray_conn_id: str = RayJobHook.default_conn_name
    token_uri: str | None = None  # where the token is, never the token (see the module's docstring)
    storage_conn_id: str | None = None  # the connection that reads `token_uri`
    python: str = "python"  # the interpreter jobs run with on the cluster

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> RayClusterRef:
        return cls(dashboard_url=info.get("dashboard_url"),
                   ray_conn_id=info.get("ray_conn_id", RayJobHook.default_conn_name),
                   token_uri=info.get("token_uri") or info.get("token_file"),
                   storage_conn_id=info.get("storage_conn_id"), python=info.get("python", "python"))

    def hook(self) -> RayJobHook:
        return RayJobHook(address=self.dashboard_url, ray_conn_id=self.ray_conn_id, token_uri=self.token_uri,
                          storage_conn_id=self.storage_conn_id)

    def trigger_kwargs(self) -> dict[str, Any]:
        """RayJobTrigger's cluster arguments (the caller adds job_id and poll_interval)."""
        return {"address": self.dashboard_url, "ray_conn_id": self.ray_conn_id, "token_uri": self.token_uri,
                "storage_conn_id": self.storage_conn_id}

    def job_url(self, job_id: str) -> str | None:
        """The job's page on the dashboard, when the cluster's dashboard URL is known."""
        return f"{self.dashboard_url.rstrip('/')}/#/jobs/{job_id}" if self.dashboard_url else None
