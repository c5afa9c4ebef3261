"""Promotion people can trust, on file:// and on S3 (moto's server on loopback): the model is copied
inside the store and checked against its commit.json at the target; champion.json is swapped by a
conditional write, so two runs promoting at once cannot both win; a promotion killed between copy
and swap leaves the old pointer, whole, and its retry finishes the job.

The operator runs here through `execute` with the two things of its context it reads (the run id
and the task instance's dag id): two dag.test() runs cannot share one SQLite database at once, and
the race needs two promotions in flight together. The end-to-end path through dag.test() is in
test_promotion.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowSkipException

from posttrain import storage_promote
from posttrain.hooks.storage import StorageHook
from posttrain.operators import promote as promote_module
from posttrain.operators.promote import PromoteOperator
from posttrain.recipe import load_recipe
from posttrain.storage_fs import COMMIT
from tests.conftest import REPO, write_recipe

pytestmark = pytest.mark.usefixtures("airflow_db")


class TaskInstance:
    """What promote reads of its task instance: the dag id, and xcom_push when it skips."""

    dag_id = "promote_race"

    def __init__(self) -> None:
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


def run_promote(workspace: str, run_id: str, conn_id: str | None) -> str:
    op = PromoteOperator(task_id="promote", workspace=workspace, storage_conn_id=conn_id)
    try:
        op.execute({"run_id": run_id, "ti": TaskInstance()})
    except AirflowSkipException:
        return "skipped"
    return "success"


def make_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[str, str | None]:
    """A storage root (file:// under tmp_path, or a fresh bucket on moto) and its connection."""
    if kind == "file":
        return f"file://{tmp_path}/storage", None
    import boto3

    moto = request.getfixturevalue("moto_server")
    bucket = f"race-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/posttrain", "aws_moto"


def run_workspace(root: str, conn_id: str | None, recipe_path: Path, run: str, eval_loss: float) -> str:
    """What train and evaluate leave in a run workspace (the export with its commit.json, as a job
    publishes it to an object store), for promote to act on."""
    store = StorageHook(conn_id).store(f"{root}/{load_recipe(recipe_path).name}/runs/{run}")
    (store / "recipe.json").write_text(load_recipe(recipe_path).model_dump_json())
    (store / "eval" / "metrics.json").write_json({"eval_loss": eval_loss})
    local = recipe_path.parent / f"export-{run}"
    local.mkdir()
    for name in ("model.safetensors", "config.json"):
        (local / name).write_bytes(f"{name} of run {run} ({eval_loss})".encode() * 100)
    files = (store / "model").put_tree(local)
    (store / "model" / COMMIT).write_json({"files": files})
    return store.uri


@pytest.mark.parametrize(("kind", "rb_loss"), [("file", 1.0), ("s3", 1.0), ("s3", 0.5)])
def test_two_promotions_at_once_one_wins(kind: str, rb_loss: float, tmp_path: Path, request: pytest.FixtureRequest,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    root, conn = make_store(kind, tmp_path, request)
    recipe_path = write_recipe(tmp_path, name="race", promotion={"decision": "mean"}, storage={"root": root,
                                                                                             "conn_id": conn})
    recipe = load_recipe(recipe_path)
    workspaces = {run: run_workspace(root, conn, recipe_path, run, loss) for run, loss in (("ra", 1.0),
                                                                                           ("rb", rb_loss))}
    # Both read the pointer (none yet) and decide before either swaps: each waits for the other
    # after its copy, then both write champion.json at once.
    both_copied = threading.Barrier(2, timeout=120)
    real_copy = promote_module.copy_tree_verified

    def copy_then_wait(src, dst):
        files = real_copy(src, dst)
        both_copied.wait()
        return files

    monkeypatch.setattr(promote_module, "copy_tree_verified", copy_then_wait)
    states: dict[str, str] = {}
    threads = [threading.Thread(target=lambda r=run: states.update({r: run_promote(workspaces[r], r, conn)}))
               for run in workspaces]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    storage = StorageHook(conn)
    if rb_loss < 1.0:
        # rb is better: whichever swapped first, the end is what the two give one after the other. If ra
        # won the swap, rb lost it, decided again against ra, and promoted over it.
        champion = storage.store(recipe.champion_uri).read_json()
        assert champion["version"] == "rb" and states["rb"] == "success", states
        if states["ra"] == "success":
            assert champion["previous_version"] == "ra"
            assert (storage.store(workspaces["rb"]) / "promotion" / "decision.json").read_json()["lost_race_to"] \
                == ["ra"]
        return
    assert sorted(states.values()) == ["skipped", "success"], states
    (winner,) = (r for r, s in states.items() if s == "success")
    (loser,) = set(workspaces) - {winner}
    champion = storage.store(recipe.champion_uri).read_json()  # whole: it parses
    assert champion["version"] == winner and champion["previous_version"] is None
    assert (storage.store(champion["model_uri"]) / COMMIT).exists()
    lost = (storage.store(workspaces[loser]) / "promotion" / "decision.json").read_json()
    assert lost["promoted"] is False and lost["lost_race_to"] == [winner]
    assert "decided again" in lost["reason"] and f"champion {winner}" in lost["reason"]
    # The loser's copy is named by no pointer: gone.
    assert storage.store(f"{root}/race/promoted").listdir() == [winner]


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_the_copy_is_checked_against_the_commit(kind: str, tmp_path: Path, request: pytest.FixtureRequest,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    root, conn = make_store(kind, tmp_path, request)
    storage = StorageHook(conn)
    recipe_path = write_recipe(tmp_path, name="check", storage={"root": root, "conn_id": conn})
    ws = storage.store(run_workspace(root, conn, recipe_path, "r1", 1.0))
    target = storage.store(f"{root}/check/promoted/r1")
    files = storage_promote.copy_tree_verified(ws / "model", target)
    assert (target / COMMIT).read_json()["files"] == files
    assert {rel: (target / rel).read_bytes() for rel in files} == {rel: (ws / "model" / rel).read_bytes()
                                                                   for rel in files}
    if kind == "s3":  # objects over CopyObject's 5 GiB take the other path: checked by size and ETag
        monkeypatch.setattr(storage_promote, "COPY_OBJECT_LIMIT", 0)
        big = storage.store(f"{root}/check/promoted/big")
        assert storage_promote.copy_tree_verified(ws / "model", big) == files and (big / COMMIT).exists()
        monkeypatch.undo()
    # An export whose bytes no longer match its commit.json (changed after it was committed): the
    # copy is refused, naming the file, and the target gets no commit.json.
    (ws / "model" / "config.json").write_bytes(b"{}")
    target.remove()
    with pytest.raises(ValueError, match=r"config\.json.*commit\.json lists"):
        storage_promote.copy_tree_verified(ws / "model", target)
    assert not (target / COMMIT).exists()


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_conditional_write(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    root, conn = make_store(kind, tmp_path, request)
    pointer = StorageHook(conn).store(f"{root}/cas/champion.json")
    assert storage_promote.read_versioned(pointer) == (None, None)
    assert storage_promote.write_if(pointer, b'{"version": "a"}', None)
    assert not storage_promote.write_if(pointer, b'{"version": "b"}', None)  # it exists now
    data, token = storage_promote.read_versioned(pointer)
    assert data == b'{"version": "a"}'
    assert storage_promote.write_if(pointer, b'{"version": "c"}', token)
    assert not storage_promote.write_if(pointer, b'{"version": "d"}', token)  # stale token
    assert pointer.read_bytes() == b'{"version": "c"}'


KILLED_AFTER_COPY = """
import os, signal, sys
from posttrain.operators import promote
from tests.integration.test_promotion_race import run_promote
real = promote.copy_tree_verified
def copy_then_die(src, dst):
    real(src, dst)
    os.kill(os.getpid(), signal.SIGKILL)  # dies between the copy and the swap
promote.copy_tree_verified = copy_then_die
run_promote(sys.argv[1], sys.argv[2], sys.argv[3] or None)
"""


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_killed_between_copy_and_swap(kind: str, tmp_path: Path, request: pytest.FixtureRequest,
                                      caplog: pytest.LogCaptureFixture) -> None:
    root, conn = make_store(kind, tmp_path, request)
    recipe_path = write_recipe(tmp_path, name="kill", promotion={"decision": "mean"},
                               storage={"root": root, "conn_id": conn})
    recipe = load_recipe(recipe_path)
    storage = StorageHook(conn)
    assert run_promote(run_workspace(root, conn, recipe_path, "r1", 2.0), "r1", conn) == "success"
    before = storage.store(recipe.champion_uri).read_bytes()

    ws = run_workspace(root, conn, recipe_path, "r2", 1.0)
    proc = subprocess.run([sys.executable, "-c", KILLED_AFTER_COPY, ws, "r2", conn or ""], cwd=REPO,
                          env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    # The copy is complete, but the pointer still names the old champion, whole.
    assert (storage.store(f"{root}/kill/promoted/r2") / COMMIT).exists()
    assert storage.store(recipe.champion_uri).read_bytes() == before

    # The retried task (same run id) finds its complete copy, does not copy again, and swaps.
    with caplog.at_level("INFO", logger="posttrain.storage_promote"):
        assert run_promote(ws, "r2", conn) == "success"
    assert "is already a complete copy" in caplog.text
    champion = json.loads(storage.store(recipe.champion_uri).read_bytes())
    assert champion["version"] == "r2" and champion["previous_version"] == "r1"
