"""A real Airflow deployment on 127.0.0.1 for the tests of this folder, started once before the
first of them and stopped after the last (it doesn't idle through the rest of the suite):
PostgreSQL from the Debian packages (a data directory of its own under .posttrain/deploy), `airflow
db migrate`, then the api-server, scheduler (LocalExecutor), dag-processor and triggerer with one
configuration, as an operator would run them. Tests drive it as users do: the REST API and a
headless Chromium.

Everything the fixture starts it stops by process id (each component leads a process group of its
own, so its children go with it), and its teardown asserts that not one of those processes is
left. Every component logs to a file under .posttrain/deploy/logs; a component that fails to come
up fails the tests with the tail of its log."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psutil
import pytest
import yaml

from posttrain.paths import cache_env
from tests.conftest import HOME, REPO, TINY, ec2_settings, free_port, local_ray_head, multinode_ray
from tests.deployment.flaky_proxy import FlakyProxy

DEPLOY = HOME / "deploy"
SCREENSHOTS = DEPLOY / "screenshots"
RECIPES = REPO / "dags" / "recipes"
CHROMIUM = Path("/usr/bin/chromium")
# The connection of the "existing" Ray cluster that `compute.provider: ray` recipes name.
EXISTING_RAY_CONN = "ray_existing"
SFT_DAG = "posttrain__tiny-sft"
RAY_DAG = "posttrain__tiny-sft-ray"
# tiny-sft on the existing cluster with `promotion.approval: required` (tests/deployment/test_approval.py).
APPROVAL_DAG = "posttrain__tiny-sft-approval"
APPROVAL_TIMEOUT_S = 20
# A dashboard in front of the existing cluster's that can be made to fail (tests/deployment/flaky_proxy.py).
FLAKY_RAY_CONN = "ray_flaky"
JOB_TIMEOUT_S = 60
DASHBOARD_RETRY_WINDOW_S = 10
# Instances launched on moto's EC2 server; the nodes' Ray is a two-node cluster on 127.0.0.1.
EC2_DAG = "posttrain__tiny-sft-ec2-long"
# DAG id → (compute overrides, the recipe's `airflow` section) of tiny-sft-ray's variants.
RAY_VARIANTS = {
    "posttrain__tiny-sft-ray-blocking": ({}, {"deferrable": False}),
    "posttrain__tiny-sft-ray-blocking-timeout": ({}, {"deferrable": False, "job_timeout_s": JOB_TIMEOUT_S}),
    "posttrain__tiny-sft-ray-deferred-timeout": ({}, {"deferrable": True, "job_timeout_s": JOB_TIMEOUT_S}),
    "posttrain__tiny-sft-ray-flaky": ({"ray_conn_id": FLAKY_RAY_CONN},
                                      {"deferrable": True, "dashboard_retry_window_s": DASHBOARD_RETRY_WINDOW_S}),
    # A Ray head of the run's own (started by the setup task, stopped by the teardown).
    "posttrain__tiny-sft-local-long": ({"provider": "local"}, {"deferrable": True}),
}
TERMINAL_RUN_STATES = ("success", "failed")
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Debian's Chromium, headless, driven by Playwright (nothing downloaded); closed on exit."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make system-deps` installs it (apt-get install chromium)",
                    pytrace=False)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                             args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "deployment: drives the real Airflow deployment of tests/deployment")


def report(config: pytest.Config, text: str) -> None:
    """A line on the terminal whatever the output capture (timings, the matrix)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        reporter.write_line(text)


def tail(path: Path, lines: int = 60) -> str:
    if not path.exists():
        return f"({path} was never written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_path(dag_id: str, run_id: str) -> str:
    """A DAG run's path in the REST API and the UI (run ids hold ':' and '+')."""
    return f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}"


def postgres_bin() -> Path:
    """The newest PostgreSQL of the Debian packages (15 on bookworm); a clear failure without one."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not found:
        pytest.fail("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): "
                    "`make system-deps` installs it (apt-get install postgresql)", pytrace=False)
    return found[-1].parent


def descendants(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def still_running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of `procs` that still run (the same process: a reused pid doesn't count)."""
    left = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(proc)
        except psutil.NoSuchProcess:
            pass
    return left


class Postgres:
    """PostgreSQL on 127.0.0.1 with a data directory of its own, owned by the `postgres` user
    (the server refuses to run as root), never the system's service."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.data = folder / "data"
        self.log = folder / "postgres.log"
        self.bin = postgres_bin()
        self.port = free_port()
        self.url = f"postgresql+psycopg2://airflow@127.0.0.1:{self.port}/airflow"

    def _run(self, *cmd: str, timeout: float = 120) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        result = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=timeout, cwd=self.folder)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}{result.stderr}\n"
                               f"--- {self.log} ---\n{tail(self.log)}")

    def start(self) -> None:
        self.folder.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "airflow", "-E", "UTF8",
                  "--no-sync")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", f"-k {self.folder} -h 127.0.0.1 -p {self.port}", "start")
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="airflow", dbname="postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("create database airflow")
        finally:
            conn.close()

    def postmaster(self) -> int | None:
        pid_file = self.data / "postmaster.pid"
        return int(pid_file.read_text().split()[0]) if pid_file.exists() else None

    def stop(self) -> None:
        if self.postmaster() is not None:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")


class Deployment:
    """The whole deployment: Postgres, then the four Airflow components, all on 127.0.0.1."""

    def __init__(self, root: Path, extra_env: dict[str, str], ec2: dict[str, Any] | None = None):
        self.root = root
        self.ec2 = ec2  # compute.ec2 of the EC2 variant (moto's network, a stand-in Ray cluster)
        self.airflow_home = root / "airflow"
        self.dags = root / "dags"
        self.logs = root / "logs"
        self.storage = root / "storage"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.username, self.password = "admin", secrets.token_urlsafe(16)
        self.extra_env = extra_env
        self.postgres = Postgres(root / "pg")
        self.procs: dict[str, subprocess.Popen] = {}
        self.started: list[psutil.Process] = []  # every process seen in a started process tree
        self.client: httpx.Client | None = None
        self.env: dict[str, str] = {}

    # -- configuration ----------------------------------------------------------------------------

    def configuration(self) -> dict[str, str]:
        """The environment of every component: one configuration, one JWT secret, all on loopback."""
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("PYTEST_", "AIRFLOW__", "AIRFLOW_CONN_"))}
        bin_dir = str(Path(sys.executable).parent)
        fernet = (self.root / "fernet.key").read_text().strip()
        return {
            **base, **cache_env(),
            "PATH": bin_dir + os.pathsep + base.get("PATH", ""),
            "POSTTRAIN_HOME": str(HOME),
            "AIRFLOW_HOME": str(self.airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__FERNET_KEY": fernet,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__CORE__AUTH_MANAGER":
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{self.username}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.root / "passwords.json"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.postgres.url,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": f"{self.url}/",
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__DEFAULT_WRAP": "True",  # long log lines (the Ray job's) wrapped in the UI
            "AIRFLOW__API__SECRET_KEY": (self.root / "secret.key").read_text().strip(),
            "AIRFLOW__API_AUTH__JWT_SECRET": (self.root / "jwt.key").read_text().strip(),
            # Log servers stay off (--skip-serve-logs): the api-server reads the log files directly.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            # The Ray job stages defer to the triggerer, as in the compose file.
            "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "True",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "600",
            "AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL": "5",  # expired deferrals found sooner
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo",
            "RAY_USAGE_STATS_ENABLED": "0", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
            "GX_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false",
            **self.extra_env,
        }

    def write_dags_folder(self) -> None:
        """The repo's dags file and the recipes the tests run, with absolute paths and storage here."""
        from posttrain.recipe import load_recipe

        recipes = self.dags / "recipes"
        recipes.mkdir(parents=True)
        shutil.copy(REPO / "dags" / "posttrain_dags.py", self.dags / "posttrain_dags.py")
        committed = load_recipe(RECIPES / "tiny-sft.yaml")
        data = yaml.safe_load((RECIPES / "tiny-sft.yaml").read_text())
        data["model"]["base"] = str(TINY)
        data["data"]["train"], data["data"]["eval"] = committed.data.train, committed.data.eval
        data["storage"]["root"] = str(self.storage)
        # Short runs: a few steps, a small evaluation (the trigger's conf sets max_steps too).
        data["training"].update(max_steps=4, warmup_steps=1, checkpoint_every=4)
        data["evaluation"].update(max_samples=8, max_new_tokens=8)
        (recipes / "tiny-sft.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        # The same recipe on an existing cluster (`compute.provider: ray`), training long enough
        # to be cancelled from the UI while its job runs.
        on_ray = {**data, "name": "tiny-sft-ray", "description": "tiny-sft on an existing Ray cluster",
                  "compute": {"provider": "ray", "ray_conn_id": EXISTING_RAY_CONN, "workers": 1},
                  "training": {**data["training"], "max_steps": 100000, "checkpoint_every": 100000}}
        (recipes / "tiny-sft-ray.yaml").write_text(yaml.safe_dump(on_ray, sort_keys=False))
        # The approval gate's DAG: short training on the existing cluster (no head to start per run).
        approval = {**data, "name": APPROVAL_DAG.removeprefix("posttrain__"), "compute": on_ray["compute"],
                    "promotion": {**data.get("promotion", {}), "approval": "required",
                                  "approval_timeout": APPROVAL_TIMEOUT_S}}
        (recipes / f"{approval['name']}.yaml").write_text(yaml.safe_dump(approval, sort_keys=False))
        # Variants for the rows of the "nothing left running" matrix: how the tasks wait (the
        # recipe's `airflow` section) and which dashboard they talk to.
        variants = dict(RAY_VARIANTS)
        if self.ec2 is not None:
            variants[EC2_DAG] = ({"provider": "ec2", "workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 1,
                                  "ec2": self.ec2}, {"deferrable": True})
        for name, (compute, waiting) in variants.items():
            variant = {**on_ray, "name": name.removeprefix("posttrain__"), "description": f"{name}: {waiting}",
                       "compute": {**on_ray["compute"], **compute}, "airflow": waiting}
            (recipes / f"{variant['name']}.yaml").write_text(yaml.safe_dump(variant, sort_keys=False))
        for path in recipes.iterdir():
            load_recipe(path)  # a recipe that doesn't validate fails here, not as an import error later

    # -- processes --------------------------------------------------------------------------------

    def _spawn(self, name: str, *args: str) -> None:
        log = (self.logs / f"{name}.log").open("ab")
        # A session (and process group) of its own: stopping it stops everything it started.
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "airflow", *args], env=self.env,
                                            cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        # Written down, so a session that was killed before its stop is cleaned up by the next one.
        started = {name: [proc.pid, psutil.Process(proc.pid).create_time()] for name, proc in self.procs.items()}
        (self.root / "pids.json").write_text(json.dumps(started))

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"airflow {name} exited with {proc.returncode} while starting:\n"
                                   f"--- {self.logs / f'{name}.log'} ---\n{tail(self.logs / f'{name}.log')}")

    def start(self) -> None:
        self.logs.mkdir(parents=True)
        self.airflow_home.mkdir(parents=True)
        for key in ("fernet", "secret", "jwt"):
            value = secrets.token_urlsafe(32)
            if key == "fernet":
                from cryptography.fernet import Fernet

                value = Fernet.generate_key().decode()
            (self.root / f"{key}.key").write_text(value)
            (self.root / f"{key}.key").chmod(0o600)
        passwords = self.root / "passwords.json"
        passwords.write_text(json.dumps({self.username: self.password}))
        passwords.chmod(0o600)
        self.env = self.configuration()
        self.write_dags_folder()
        self.postgres.start()
        with (self.logs / "db-migrate.log").open("wb") as log:
            migrate = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=self.env,
                                     cwd=self.root, stdout=log, stderr=subprocess.STDOUT, timeout=600)
        if migrate.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed:\n{tail(self.logs / 'db-migrate.log')}")
        self._spawn("api-server", "api-server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1")
        self._spawn("scheduler", "scheduler", "--skip-serve-logs")
        self._spawn("dag-processor", "dag-processor")
        self._spawn("triggerer", "triggerer", "--skip-serve-logs")
        self.wait_healthy(timeout=300)
        self.client = self.login()

    def wait_healthy(self, timeout: float) -> None:
        """Until the api-server answers and reports the database, scheduler, dag processor and
        triggerer healthy (their heartbeats in the database)."""
        deadline, health = time.monotonic() + timeout, "no answer"
        while True:
            self._check_alive()
            try:
                response = httpx.get(f"{self.url}/api/v2/monitor/health", timeout=5)
                if response.status_code == 200:
                    health = response.json()
                    if all((health.get(part) or {}).get("status") == "healthy"
                           for part in ("metadatabase", "scheduler", "triggerer", "dag_processor")):
                        return
            except httpx.HTTPError as exc:
                health = f"no answer ({type(exc).__name__})"
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {name} ---\n{tail(self.logs / f'{name}.log', 25)}" for name in COMPONENTS)
                raise RuntimeError(f"the deployment was not healthy within {timeout:.0f}s: {health}\n{logs}")
            time.sleep(1)

    def login(self) -> httpx.Client:
        response = httpx.post(f"{self.url}/auth/token", json={"username": self.username, "password": self.password},
                              timeout=30)
        assert response.status_code == 201, response.text
        token = response.json()["access_token"]
        return httpx.Client(base_url=f"{self.url}/api/v2", headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def stop(self) -> list[psutil.Process]:
        """Stop every component (scheduler first: no new work), then Postgres; the processes left."""
        if self.client is not None:
            self.client.close()
        for proc in self.procs.values():
            self.started += [p for p in descendants(proc.pid) if p not in self.started]
        if (pid := self.postgres.postmaster()) is not None:
            self.started += descendants(pid)
        for name in ("scheduler", "triggerer", "dag-processor", "api-server"):
            if name in self.procs:
                stop_group(self.procs[name])
        self.postgres.stop()
        left = still_running(self.started)
        for proc in left:  # don't leave them behind for the next session; the caller fails on them
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        return left

    # -- the REST API, as the UI uses it ----------------------------------------------------------

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        assert self.client is not None
        response = self.client.request(method, path, **kwargs)
        assert response.status_code < 300, f"{method} {path}: HTTP {response.status_code}: {response.text[:1000]}"
        return response.json() if response.content else None

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        """Unpause the DAG and trigger a run with `conf` (the body the UI's trigger form posts)."""
        self.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
        run = self.api("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})
        return run["dag_run_id"]

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict[str, Any]]:
        tis = self.api("GET", f"{run_path(dag_id, run_id)}/taskInstances")["task_instances"]
        return {ti["task_id"]: ti for ti in tis}

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        return {task: ti["state"] for task, ti in self.task_instances(dag_id, run_id).items()}

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            run = self.api("GET", run_path(dag_id, run_id))
            if run["state"] in TERMINAL_RUN_STATES:
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"{dag_id} run {run_id} still {run['state']} after {timeout:.0f}s: "
                                     f"{self.task_states(dag_id, run_id)}\n--- scheduler ---\n"
                                     f"{tail(self.logs / 'scheduler.log', 30)}")
            time.sleep(2)

    def wait_for_task(self, dag_id: str, run_id: str, task_id: str, states: tuple[str, ...],
                      timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            state = self.task_states(dag_id, run_id).get(task_id)
            if state in states:
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"{dag_id}.{task_id} of {run_id} is {state}, not {states}, after "
                                     f"{timeout:.0f}s: {self.task_states(dag_id, run_id)}")
            time.sleep(1)

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        """The task's whole log as the UI shows it (structured entries, one line each)."""
        body = self.api("GET", f"{run_path(dag_id, run_id)}/taskInstances/{task_id}/logs/{try_number}",
                        params={"full_content": "true"}, headers={"Accept": "application/json"})
        content = body["content"]
        if isinstance(content, str):
            return content
        return "\n".join(entry.get("event", "") if isinstance(entry, dict) else str(entry) for entry in content)


def stop_group(proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM to the process group `proc` leads, then SIGKILL to whatever of it is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the leader's children may outlive it in its group
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def clean_previous(root: Path) -> None:
    """An earlier session that was killed may have left its components and Postgres running: stop
    them (by the process ids it wrote down), then start afresh."""
    pids = root / "pids.json"
    for pid, created in json.loads(pids.read_text()).values() if pids.exists() else ():
        try:
            if psutil.Process(pid).create_time() == created:
                os.killpg(pid, signal.SIGKILL)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    data = root / "pg" / "data"
    if (data / "postmaster.pid").exists():
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, str(postgres_bin() / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
    for child in root.iterdir() if root.exists() else []:
        if child.name != "screenshots":
            shutil.rmtree(child) if child.is_dir() else child.unlink()


@pytest.fixture(scope="package")
def existing_ray() -> Iterator[dict[str, Any]]:
    """The "existing" Ray cluster of `compute.provider: ray` recipes: a local head the runs don't own."""
    yield from local_ray_head(num_cpus=2)


@pytest.fixture(scope="package")
def flaky_dashboard(existing_ray: dict[str, Any]) -> Iterator[FlakyProxy]:
    """The existing cluster's dashboard behind a proxy that fails on demand (the `ray_flaky` connection)."""
    proxy = FlakyProxy(existing_ray["dashboard_url"]).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="package")
def ec2_ray() -> Iterator[dict[str, str]]:
    """What the EC2 variant's instances would run: a head and one worker node on 127.0.0.1."""
    DEPLOY.mkdir(parents=True, exist_ok=True)
    yield from multinode_ray(2, DEPLOY.parent / "deploy-ec2-ray.log")


@pytest.fixture(scope="package")
def deployment(tiny_model: Path, existing_ray: dict[str, Any], flaky_dashboard: FlakyProxy, ec2_network: dict,
               ec2_ray: dict[str, str], pytestconfig: pytest.Config) -> Iterator[Deployment]:
    """The running deployment; afterwards none of its processes is left."""
    clean_previous(DEPLOY)
    DEPLOY.mkdir(parents=True, exist_ok=True)
    token = Path(existing_ray["token_file"]).read_text().strip()
    urls = {EXISTING_RAY_CONN: existing_ray["dashboard_url"], FLAKY_RAY_CONN: flaky_dashboard.url}
    conns = {name: {"conn_type": "ray", "host": url, "password": token} for name, url in urls.items()}
    env = {f"AIRFLOW_CONN_{name.upper()}": json.dumps(conn) for name, conn in conns.items()}
    env["AIRFLOW_CONN_AWS_MOTO"] = os.environ["AIRFLOW_CONN_AWS_MOTO"]  # moto's server (tests/conftest.py)
    ec2 = ec2_settings(ec2_network, worker_nodes=1, dashboard_url=ec2_ray["dashboard_url"])
    dep = Deployment(DEPLOY, env, ec2=ec2)
    started = time.monotonic()
    try:
        dep.start()
        report(pytestconfig, f"\nAirflow deployment at {dep.url} up in {time.monotonic() - started:.0f}s "
                             f"(logs: {dep.logs})")
        yield dep
    finally:
        left = dep.stop()
    assert not left, "processes of the deployment survived its stop (killed now): " + ", ".join(
        f"{p.pid} ({' '.join(p.cmdline()[:4])})" if p.is_running() else str(p.pid) for p in left)


@pytest.fixture(scope="package")
def sft_run(deployment: Deployment, pytestconfig: pytest.Config) -> dict[str, Any]:
    """One finished run of posttrain__tiny-sft, triggered through the REST API with a conf, shared
    by the REST and the browser tests."""
    params = deployment.api("GET", f"/dags/{SFT_DAG}/details")["params"]
    # The UI's form posts every param's value; a trigger changes some of them.
    conf = {name: spec["value"] for name, spec in params.items()}
    conf.update(max_steps=5, learning_rate=2e-3)
    started = time.monotonic()
    run_id = deployment.trigger(SFT_DAG, conf)
    run = deployment.wait_for_run(SFT_DAG, run_id, timeout=900)
    report(pytestconfig, f"\n{SFT_DAG} run {run_id}: {run['state']} in {time.monotonic() - started:.0f}s")
    return {"run_id": run_id, "run": run, "conf": conf}
