"""A Ray head on 127.0.0.1 for `compute.provider: local`: started with `ray start --head` by the
setup task, stopped (every process of it, and only those) by the teardown task."""

from __future__ import annotations

import contextlib
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

from posttrain.hooks.ray import RayJobError, RayJobHook
from posttrain.paths import cache_env, ray_temp_dir


def free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports: every socket stays bound until all are picked (one
    at a time, the OS may hand the same just-released port out twice, and Ray refuses to start
    with two components on one port)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


class StartAgain(RayJobError):
    """A head that failed for a reason a fresh head does not share: started again (see start)."""


class NodeStartTimedOut(StartAgain):
    """The raylet did not register with the GCS in time (a machine under load)."""


class PortTaken(StartAgain):
    """A port picked for the head was taken by another process before the head bound it."""


START_ATTEMPTS = 3


class LocalRayCluster:
    """A Ray head on 127.0.0.1 started with `ray start --head`, stopped by its own temp dir."""

    @classmethod
    def start(cls, num_cpus: int, timeout: float = 120.0, node_env: dict[str, str] | None = None,
              token: str | None = None) -> dict[str, Any]:
        """`node_env`: what every process of the head gets in its environment (a node's S3
        credentials: jobs inherit them from the raylet, so they are in no job's spec). `token`: the
        cluster's auth token, kept by the caller (a run's is in its workspace: see cluster_token);
        without one the head makes its own, in a 0600 `token_file` beside its temp dir.

        The head's ports are picked free, then released for `ray start` to bind: another process
        can take one in between. Ray does not always fail on that (a dashboard agent whose HTTP
        port is taken stays up without it, and every job submission then gets "No available agent
        to submit job"), so the head is checked to listen on each port it was given, and started
        again on fresh ports (up to START_ATTEMPTS heads) where it does not. A head whose raylet did
        not register with the GCS within Ray's fixed 30 s (seen on 2 loaded cores) is started again
        the same way."""
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                return cls._start(num_cpus, timeout, node_env, token)
            except StartAgain:
                if attempt == START_ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _start(cls, num_cpus: int, timeout: float, node_env: dict[str, str] | None,
               token: str | None) -> dict[str, Any]:
        cluster_id = uuid.uuid4().hex[:6]
        temp_dir = ray_temp_dir(cluster_id)
        temp_dir.mkdir(parents=True, exist_ok=True)
        # Token auth on, with a token of this cluster's own (not ~/.ray/auth_token).
        token_file = None
        if token is None:
            token = secrets.token_hex(32)
            token_file = temp_dir / "auth_token"
            token_file.touch(mode=0o600)
            token_file.write_text(token)
        gcs, dashboard, agent_http, agent_grpc, metrics, runtime_env_agent, client = free_ports(7)
        bin_dir = str(Path(sys.executable).parent)
        env = {**os.environ, **{k: v for k, v in cache_env().items() if k not in os.environ}, **(node_env or {})}
        env.update({
            # Jobs run `python` from the head's PATH: make it this interpreter's environment.
            "PATH": bin_dir + os.pathsep + env.get("PATH", ""),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            # Every process of this head (job drivers, Ray Train's controller and its placement
            # group cleaner) connects to this head: "auto" would find every head on the machine
            # and refuse ("Found multiple active Ray instances").
            "RAY_ADDRESS": f"127.0.0.1:{gcs}",
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
            "--dashboard-agent-listen-port", str(agent_http),
            "--dashboard-agent-grpc-port", str(agent_grpc),
            "--metrics-export-port", str(metrics),
            "--runtime-env-agent-port", str(runtime_env_agent),
            "--ray-client-server-port", str(client),
            "--num-cpus", str(num_cpus), "--num-gpus", "0",
            "--temp-dir", str(temp_dir), "--disable-usage-stats", "--include-dashboard", "true",
        ]
        info = {"provider": "local", "cluster_id": cluster_id, "address": f"127.0.0.1:{gcs}",
                "dashboard_url": f"http://127.0.0.1:{dashboard}", "temp_dir": str(temp_dir),
                "python": sys.executable}
        if token_file is not None:
            info["token_file"] = str(token_file)
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
            error = (PortTaken if "already in use" in output
                     else NodeStartTimedOut if "timed out during startup" in output else RayJobError)
            raise error(f"`ray start --head` failed with exit code {code}:\n{output}")
        try:
            RayJobHook(address=info["dashboard_url"], token=token).wait_ready(timeout)
            # The components Jobs need: GCS, dashboard, its agent (HTTP: submissions; gRPC), runtime envs.
            cls.wait_listening(info, {gcs, dashboard, agent_http, agent_grpc, runtime_env_agent}, timeout)
        except RayJobError:
            cls.stop(info)
            raise
        return info

    @classmethod
    def listening_ports(cls, info: dict[str, Any]) -> set[int]:
        """The loopback ports the head's own processes listen on."""
        import psutil

        ports: set[int] = set()
        for proc in cls.processes(info):
            try:
                ports |= {c.laddr.port for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return ports

    @classmethod
    def wait_listening(cls, info: dict[str, Any], ports: set[int], timeout: float) -> None:
        """Until the head's processes listen on every one of `ports`. PortTaken as soon as another
        process listens on a missing one, or after `timeout` seconds."""
        import psutil

        deadline = time.monotonic() + timeout
        while missing := ports - cls.listening_ports(info):
            # Not ours (ours were just checked), so another process's: no use waiting for it.
            taken = missing & {c.laddr.port for c in psutil.net_connections(kind="inet")
                               if c.status == psutil.CONN_LISTEN}
            if taken or time.monotonic() > deadline:
                why = "taken by another process" if taken else f"not listening after {timeout:.0f}s"
                raise PortTaken(f"the Ray head {info['cluster_id']} does not listen on port(s) "
                                f"{sorted(taken or missing)} it was started with ({why})")
            time.sleep(0.5)

    @staticmethod
    def processes(info: dict[str, Any]) -> list:
        """Every process of this head: those naming its temp dir or its GCS address (the Ray client
        server names only the latter), and their children."""
        import psutil

        temp_dir, address = info["temp_dir"].rstrip("/"), info.get("address")

        def names_this_head(part: str) -> bool:
            # Whole path / whole address only: another head's "…/ray/ab12" or ":63790" is not ours.
            return (part == temp_dir or part.endswith(f"={temp_dir}") or f"{temp_dir}/" in part
                    or bool(address) and (part == address or part.endswith(f"={address}")))

        found: dict[int, psutil.Process] = {}
        me = psutil.Process()
        spared = {me.pid, *(p.pid for p in me.parents())}
        for proc in psutil.process_iter(["cmdline"]):
            if proc.pid in spared:
                continue
            try:
                if any(names_this_head(part) for part in proc.info["cmdline"] or ()):
                    # Job drivers are children of Ray workers and don't name the temp dir.
                    for p in [proc, *proc.children(recursive=True)]:
                        if p.pid not in spared:
                            found[p.pid] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return list(found.values())

    @classmethod
    def stop(cls, info: dict[str, Any], grace: float = 1.5) -> int:
        """Stop every process of this head (and only this one). Returns how many were running.

        SIGTERM first (job drivers and workers exit within the grace), then SIGKILL for the rest:
        the GCS, raylet, monitor and runtime-env agent take 5 s and more to shut down gracefully,
        and nothing of theirs is kept (the temp dir goes with them)."""
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
