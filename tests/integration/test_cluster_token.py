"""The run's Ray token lives in the run's storage (posttrain/hooks/cluster_token.py), so the setup
task, the trigger of a job task and the teardown need no local directory in common: here each runs
in a process of its own, with a home and working directory of its own, against an s3:// workspace
on moto's server, and only what Airflow carries between tasks (XCom, trigger kwargs) passes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from posttrain.hooks.cluster_token import ensure_token, remove_token, token_uri
from posttrain.hooks.local_ray import LocalRayCluster
from posttrain.hooks.storage import StorageHook
from posttrain.recipe import load_recipe
from tests.conftest import REPO, write_recipe

CONN = "aws_moto"  # moto's server, as an Airflow connection (tests/conftest.py moto_server)


@pytest.fixture
def bucket(moto_server: str) -> str:
    import boto3

    name = f"tok-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def workspace(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, StorageHook]]:
    if request.param == "local":
        yield str(tmp_path / "runs" / "r1"), StorageHook()
    else:
        yield f"s3://{request.getfixturevalue('bucket')}/runs/r1", StorageHook(CONN)


def test_the_token_is_kept_private_reused_by_a_retry_and_removed(workspace: tuple[str, StorageHook]) -> None:
    ws, storage = workspace
    token = ensure_token(storage, ws)
    assert len(token) >= 32 and ensure_token(storage, ws) == token  # a retried setup reuses it
    store = storage.store(token_uri(ws))
    assert store.read_text() == token
    if store.local is not None:
        assert stat.S_IMODE(store.local.stat().st_mode) == 0o600
        assert stat.S_IMODE(store.local.parent.stat().st_mode) == 0o700
    remove_token(storage, ws)
    assert not store.exists() and not storage.store(f"{ws}/secrets").exists()
    assert ensure_token(storage, ws) != token  # a new run's cluster, a new token


def _step(step: str, home: Path, workspace: str, given: Any) -> Any:
    """Run one step in a process whose home and working directory are its own."""
    home.mkdir(parents=True, exist_ok=True)
    given_file, out = home / f"{step}-in.json", home / f"{step}-out.json"
    given_file.write_text(json.dumps(given))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_ENDPOINT_URL", "POSTTRAIN_HOME"))}
    env.update(POSTTRAIN_HOME=str(home), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "tests.cluster_steps", step, workspace, CONN, str(given_file),
                           str(out)], cwd=home, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{step}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def _files_holding(text: str, *folders: Path) -> list[str]:
    found = []
    for folder in folders:
        for path in folder.rglob("*"):
            try:
                if path.is_file() and not path.is_symlink() and text.encode() in path.read_bytes():
                    found.append(str(path))
            except OSError:  # a socket or a file gone meanwhile
                continue
    return found


@pytest.mark.slow
def test_setup_trigger_and_teardown_share_no_local_directory(bucket: str, tmp_path: Path) -> None:
    ws = f"s3://{bucket}/runs/tiny/manual__tokens"
    storage = StorageHook(CONN)
    recipe = load_recipe(write_recipe(tmp_path / "recipe", compute={"provider": "local", "workers": 1},
                                      storage={"root": f"s3://{bucket}/runs", "conn_id": CONN}))
    storage.write_json_atomic(f"{ws}/recipe.json", recipe.model_dump(mode="json"))
    setup_home, worker_home, triggerer_home, teardown_home = (tmp_path / n for n in
                                                               ("setup", "worker", "triggerer", "teardown"))

    info = _step("setup", setup_home, ws, None)
    try:
        token = storage.store(token_uri(ws)).read_text()
        # What the tasks after it get: where the token is, never the token.
        assert info["token_uri"] == f"{ws}/secrets/ray-token" and info["storage_conn_id"] == CONN
        assert token not in json.dumps(info) and "token_file" not in info

        deferred = _step("submit", worker_home, ws, info)
        assert token not in json.dumps(deferred)
        assert deferred["kwargs"]["token_uri"] == info["token_uri"]
        event = _step("follow", triggerer_home, ws, deferred)
        assert event["status"] == "SUCCEEDED", event
        assert "hello from the run cluster" in event["log_tail"], event

        # No local file holds the token: not the homes of the processes that used it, not the
        # head's own folder (Ray got it in its environment).
        homes = (setup_home, worker_home, triggerer_home, Path(info["temp_dir"]))
        assert _files_holding(token, *homes) == []
    finally:
        result = _step("teardown", teardown_home, ws, info)
    assert result["stopped"] > 0 and LocalRayCluster.processes(info) == []
    # The cluster is gone and so is its token.
    assert not storage.store(f"{ws}/secrets").exists()
    assert storage.store(f"{ws}/cluster.json").exists()  # what the run keeps of its cluster
