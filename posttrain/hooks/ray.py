"""Ray clusters and the Ray Jobs REST API.

`RayJobHook` talks HTTP to a cluster's dashboard (submit, status, logs, stop), so an Airflow
worker needs no `ray` package to run a job on a remote cluster. `LocalRayCluster` starts and
stops a Ray head on 127.0.0.1 for `compute.provider: local`.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from airflow.sdk import BaseHook

from posttrain.paths import cache_env, posttrain_home

TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
LOG_TAIL_LINES = 40


def job_outcome(job_id: str, job: dict, logs: str) -> dict[str, Any]:
    """What a finished job reports to its task: status, message and the last lines of its log."""
    return {"status": job["status"], "job_id": job_id, "message": job.get("message") or "",
            "log_tail": "\n".join(logs.splitlines()[-LOG_TAIL_LINES:])}


class RayJobError(RuntimeError):
    pass


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayCluster:
    """A Ray head on 127.0.0.1 started with `ray start --head`, stopped by its own temp dir."""

    # Unix socket paths may not exceed 107 bytes; Ray adds up to 65 under the temp dir
    # ("/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store").
    MAX_TEMP_DIR = 42

    @staticmethod
    def temp_dir(cluster_id: str) -> Path:
        preferred = posttrain_home() / "ray" / cluster_id
        if len(str(preferred)) <= LocalRayCluster.MAX_TEMP_DIR:
            return preferred
        # A deep checkout would overflow Ray's socket paths: fall back to a short per-user folder.
        return Path(f"/tmp/posttrain-ray-{os.getuid()}") / cluster_id

    @classmethod
    def start(cls, num_cpus: int, timeout: float = 120.0) -> dict[str, Any]:
        cluster_id = uuid.uuid4().hex[:6]
        temp_dir = cls.temp_dir(cluster_id)
        temp_dir.mkdir(parents=True, exist_ok=True)
        # Token auth on, with a token of this cluster's own (not ~/.ray/auth_token).
        token = secrets.token_hex(32)
        token_file = temp_dir / "auth_token"
        token_file.touch(mode=0o600)
        token_file.write_text(token)
        gcs, dashboard = _free_port(), _free_port()
        bin_dir = str(Path(sys.executable).parent)
        env = {**os.environ, **{k: v for k, v in cache_env().items() if k not in os.environ}}
        env.update({
            # Jobs run `python` from the head's PATH: make it this interpreter's environment.
            "PATH": bin_dir + os.pathsep + env.get("PATH", ""),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_TMPDIR": str(temp_dir),
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": token,
            "MASTER_ADDR": "127.0.0.1",
            "GLOO_SOCKET_IFNAME": env.get("GLOO_SOCKET_IFNAME", "lo"),
            "VLLM_HOST_IP": "127.0.0.1",
            "VLLM_LOOPBACK_IP": "127.0.0.1",
        })
        cmd = [
            str(Path(bin_dir) / "ray"), "start", "--head",
            "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
            "--port", str(gcs), "--dashboard-port", str(dashboard),
            "--dashboard-agent-listen-port", str(_free_port()),
            "--dashboard-agent-grpc-port", str(_free_port()),
            "--metrics-export-port", str(_free_port()),
            "--runtime-env-agent-port", str(_free_port()),
            "--ray-client-server-port", str(_free_port()),
            "--num-cpus", str(num_cpus), "--num-gpus", "0",
            "--temp-dir", str(temp_dir), "--disable-usage-stats", "--include-dashboard", "true",
        ]
        info = {"provider": "local", "cluster_id": cluster_id, "address": f"127.0.0.1:{gcs}",
                "dashboard_url": f"http://127.0.0.1:{dashboard}", "temp_dir": str(temp_dir),
                "python": sys.executable, "token_file": str(token_file)}
        # Output goes to a file, not a pipe: the daemons `ray start` leaves behind inherit its
        # stdout, and a pipe would stay open until they exit.
        log_path = temp_dir / "ray-start.log"
        try:
            with log_path.open("w") as log:
                code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = f"none: still starting after {timeout:.0f}s"
        if code != 0:
            output = log_path.read_text()[-3000:]
            cls.stop(info)
            raise RayJobError(f"`ray start --head` failed with exit code {code}:\n{output}")
        try:
            RayJobHook(address=info["dashboard_url"], token_file=info["token_file"]).wait_ready(timeout)
        except RayJobError:
            cls.stop(info)
            raise
        return info

    @staticmethod
    def processes(info: dict[str, Any]) -> list:
        """Every process of this head: those naming its temp dir or its GCS address (the Ray client
        server names only the latter), and their children."""
        import psutil

        keys = [info["temp_dir"]] + ([f"={info['address']}"] if info.get("address") else [])
        found: dict[int, psutil.Process] = {}
        me = psutil.Process()
        spared = {me.pid, *(p.pid for p in me.parents())}
        for proc in psutil.process_iter(["cmdline"]):
            if proc.pid in spared:
                continue
            try:
                if any(key in part for part in proc.info["cmdline"] or () for key in keys):
                    # Job drivers are children of Ray workers and don't name the temp dir.
                    for p in [proc, *proc.children(recursive=True)]:
                        if p.pid not in spared:
                            found[p.pid] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return list(found.values())

    @classmethod
    def stop(cls, info: dict[str, Any], grace: float = 5.0) -> int:
        """Stop every process of this head (and only this one). Returns how many were running."""
        import psutil

        procs = cls.processes(info)
        for proc in procs:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        _gone, alive = psutil.wait_procs(procs, timeout=grace)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=grace)
        shutil.rmtree(info["temp_dir"], ignore_errors=True)
        return len(procs)
