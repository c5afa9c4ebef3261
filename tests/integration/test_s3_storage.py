"""The run workspace on moto's S3 server (loopback) and on a local disk, through the same code:
the Store, prepare's shards and manifest, and DCP checkpoints with their commit marker (a checkpoint
without its marker is never resumed from; pruning keeps the newest complete ones)."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from posttrain.prep.prepare import prepare
from posttrain.recipe import load_recipe
from posttrain.storage_fs import COMMIT, Store, upload_folder
from posttrain.training_lib import checkpoint
from posttrain.training_lib.data.loader import read_blocks, read_documents, read_manifest
from tests.conftest import write_recipe


@pytest.fixture
def s3_root(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh bucket on the moto server, reached from the environment as a Ray job reaches it."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    bucket = f"ws-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    yield f"s3://{bucket}/runs"


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "ws") if request.param == "local" else request.getfixturevalue("s3_root")


def test_store_reads_writes_lists_and_removes(root: str) -> None:
    store = Store.at(root)
    assert store.listdir() == [] and not (store / "x.json").exists()
    (store / "a" / "x.json").write_json({"a": 1})
    with (store / "a" / "b.bin").open("wb") as fh:
        fh.write(b"0123456789")
    assert (store / "a" / "x.json").read_json() == {"a": 1}
    assert store.listdir() == ["a"] and (store / "a").listdir() == ["b.bin", "x.json"]
    assert (store / "a").sizes() == {"b.bin": 10, "x.json": len((store / "a" / "x.json").read_bytes())}
    (store / "a" / "b.bin").remove()
    assert (store / "a").listdir() == ["x.json"]
    (store / "a").remove()
    assert store.listdir() == []
    (store / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json: not valid JSON"):
        (store / "bad.json").read_json()


def test_uploaded_folders_are_complete_only_with_their_commit(s3_root: str, tmp_path: Path) -> None:
    local = tmp_path / "model"
    (local / "sub").mkdir(parents=True)
    (local / "config.json").write_text('{"a": 1}')
    (local / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 100)
    store = Store.at(f"{s3_root}/r2") / "model"
    (store / "stale.bin").write_bytes(b"from an earlier upload")
    files = upload_folder(local, store)
    assert (store / COMMIT).read_json() == {"files": files}
    assert sorted(files) == ["config.json", "sub/weights.bin"] and files["sub/weights.bin"]["size"] == 25600
    assert sorted(store.sizes()) == [COMMIT, "config.json", "sub/weights.bin"]  # replaced, not merged

    fetched = tmp_path / "fetched"  # another node: checked against the COMMIT
    store.get_tree(fetched, files)
    assert (fetched / "sub" / "weights.bin").read_bytes() == bytes(range(256)) * 100
    (store / "config.json").write_text('{"a": 2}')  # changed after its commit
    with pytest.raises(ValueError, match=r"model/config\.json: 8 bytes with sha256 .* but commit.json lists"):
        store.get_tree(tmp_path / "again", files)


def test_metrics_and_mlflow_of_a_job_live_in_the_bucket(s3_root: str, tmp_path: Path, tiny_model: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """An s3:// run's step records and its MLflow database are objects of the workspace (SQLite held
    in the job's memory, saved whole): a job resumed anywhere continues both, and nothing of them
    is ever written to the local disk."""
    import sqlite3

    from mlflow import MlflowClient

    from posttrain.training_lib.metrics import make_step_logger, read_metrics

    recipe = load_recipe(write_recipe(tmp_path, name="s3-metrics", storage={"root": s3_root},
                                      model={"base": str(tiny_model)}))
    workspace = Store.at(f"{s3_root}/s3-metrics/runs/manual__1")
    # Every local place a job could write to, empty: posttrain's home, $HOME, the temp dir, the cwd.
    places = {name: tmp_path / name for name in ("posttrain_home", "home", "tmp", "cwd")}
    for place in places.values():
        place.mkdir()
    monkeypatch.setenv("POSTTRAIN_HOME", str(places["posttrain_home"]))
    monkeypatch.setenv("HOME", str(places["home"]))
    monkeypatch.setattr(tempfile, "tempdir", str(places["tmp"]))
    monkeypatch.chdir(places["cwd"])

    def job(steps: list[int], start_step: int) -> None:
        logger = make_step_logger(recipe, workspace, 0, 1, "cpu", 3, {"strategy": "ddp"}, start_step=start_step)
        for step in steps:
            logger.log(step, 1.0 / step, 1e-3, 0.5, tokens=64)
            if step == 2:
                logger.flush()  # its checkpoint
        if start_step == 0:
            return  # killed after step 3, before it flushed again
        logger.close()

    job([1, 2, 3], 0)
    assert not [p for place in places.values() for p in place.rglob("*")]
    assert [r["step"] for r in read_metrics(workspace / "train" / "metrics.jsonl")] == [1, 2]
    job([3], 2)
    assert not [p for place in places.values() for p in place.rglob("*")]
    assert [r["step"] for r in read_metrics(workspace / "train" / "metrics.jsonl")] == [1, 2, 3]
    assert (workspace / "train" / "mlflow_run.json").read_json()["tracking_uri"] == \
        f"{workspace.uri}/train/mlflow.db"
    database = tmp_path / "downloaded.db"  # what a user does to browse it
    database.write_bytes((workspace / "train" / "mlflow.db").read_bytes())
    assert sqlite3.connect(database).execute("PRAGMA integrity_check").fetchone() == ("ok",)
    client = MlflowClient(f"sqlite:///{database}")
    (run,) = client.search_runs([client.get_experiment_by_name(recipe.name).experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "manual__1"  # one run across both jobs
    assert {m.step for m in client.get_metric_history(run.info.run_id, "loss")} == {1, 2, 3}
    assert run.data.params["workspace"] == workspace.uri


@pytest.mark.parametrize("mode", ["offline", "streaming"])
def test_prepare_to_s3_gives_the_local_shards(s3_root: str, tmp_path: Path, tiny_model: Path, mode: str) -> None:
    recipe = load_recipe(write_recipe(tmp_path, data={"packing": {"mode": mode}}))
    local, remote = tmp_path / "local", f"{s3_root}/prep-{mode}"
    assert prepare(recipe, local) == prepare(recipe, remote)
    manifest = read_manifest(local)
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    assert shards and all((Store.at(remote) / s).read_bytes() == (local / s).read_bytes() for s in shards)
    # A job reads them back from the store.
    if mode == "streaming":
        assert read_documents(Store.at(remote), "train") == read_documents(local, "train")
    blocks, want = read_blocks(Store.at(remote), "eval"), read_blocks(local, "eval")
    assert all(blocks[k].equal(want[k]) for k in want)


@pytest.fixture
def process_group() -> Iterator[None]:
    """A one-rank gloo group: the collectives of save/load run as in a job of one worker."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(8, 16)).sum().backward()
    optimizer.step()
    return model, optimizer


def test_checkpoint_commit_marker_resume_and_pruning(root: str, process_group: None) -> None:
    ckpts = Store.at(root) / "checkpoints"
    model, optimizer = _model_and_optimizer(0)
    for step in (2, 4, 6):
        checkpoint.save(ckpts, step, model, optimizer, {"batch": step}, rank=0, keep=2)
    assert [p.name for p in checkpoint.complete_checkpoints(ckpts)] == ["step-00000004", "step-00000006"]
    assert ckpts.listdir() == ["step-00000004", "step-00000006"]
    # A job killed while writing step 8: every shard is there, the marker is not.
    partial = ckpts / "step-00000008"
    for name in (ckpts / "step-00000006").sizes():
        if name != checkpoint.COMMIT:
            (partial / name).write_bytes((ckpts / "step-00000006" / name).read_bytes())
    assert checkpoint.latest_checkpoint(ckpts).name == "step-00000006"

    saved = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    model(torch.randn(8, 16)).sum().backward()
    optimizer.step()
    assert any(not saved[k].equal(v) for k, v in model.state_dict().items())
    step, state = checkpoint.load(checkpoint.latest_checkpoint(ckpts), model, optimizer, rank=0)
    assert (step, state) == (6, {"batch": 6})
    assert all(saved[k].equal(v) for k, v in model.state_dict().items())

    # Step 8 written again (the resumed job got there): the leftover is replaced and committed, and
    # pruning then keeps the two newest complete ones.
    checkpoint.save(ckpts, 8, model, optimizer, {"batch": 8}, rank=0, keep=2)
    assert ckpts.listdir() == ["step-00000006", "step-00000008"]
    assert checkpoint.latest_checkpoint(ckpts).name == "step-00000008"


def test_checkpoint_with_a_missing_shard_is_refused(root: str, process_group: None) -> None:
    ckpts = Store.at(root) / "checkpoints"
    model, optimizer = _model_and_optimizer(0)
    path = checkpoint.save(ckpts, 1, model, optimizer, {}, rank=0, keep=1)
    shard = next(n for n in path.listdir() if n.endswith(".distcp"))
    (path / shard).remove()
    with pytest.raises(RuntimeError, match=f"step-00000001: 1 of the files its commit.json names.*{shard}"):
        checkpoint.load(path, model, optimizer, rank=0)


def test_prepare_task_writes_to_s3_through_its_connection(s3_root: str, moto_server: str, tmp_path: Path,
                                                          tiny_model: Path, model_cache_home: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The Airflow task reaches the bucket with the recipe's storage connection alone (no endpoint
    or credentials in its environment) and returns the manifest's URI in the workspace; the model
    (its tokenizer, and config.json for the plan check) is in the bucket too."""
    from posttrain import model_cache
    from posttrain.hooks.storage import StorageHook
    from posttrain.operators.prepare import PrepareDataOperator
    from posttrain.planning import check_plan

    base = f"{s3_root}/models/tiny"
    model_cache.upload(tiny_model, base)
    recipe = load_recipe(write_recipe(tmp_path, model={"base": base}))
    workspace = f"{s3_root}/task"
    (Store.at(workspace) / "recipe.json").write_text(recipe.model_dump_json())
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    plan = check_plan(recipe, models=lambda uri: StorageHook("aws_moto").path(uri).fs)
    assert plan["checked"] and plan["model"]["vocab"] > 0
    out = PrepareDataOperator(task_id="prepare_data", workspace=workspace, storage_conn_id="aws_moto").execute({})
    assert out["manifest"] == f"{workspace}/data/manifest.json"
    assert [p.name for p in model_cache.cache_root().iterdir() if (p / model_cache.ENTRY).exists()]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    manifest = (Store.at(workspace) / "data" / "manifest.json").read_json()
    assert out["splits"]["train"]["rows"] == manifest["splits"]["train"]["rows"] > 0
    assert all((Store.at(workspace) / s).exists() for s in manifest["splits"]["train"]["shards"])


def test_node_environment_reaches_the_bucket_alone(s3_root: str, moto_server: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """What a local head gets from the storage connection is all a job needs to reach the bucket;
    without an AWS connection there is nothing to give."""
    from posttrain.hooks.storage import StorageHook

    assert StorageHook(None).node_environment() == {}
    env = StorageHook("aws_moto").node_environment()
    assert env == {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_ENDPOINT_URL_S3": moto_server, "AWS_DEFAULT_REGION": "us-east-1"}
    (StorageHook("aws_moto").store(s3_root) / "hello.txt").write_text("from the task")
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert (Store.at(s3_root) / "hello.txt").read_text() == "from the task"


def test_run_summary_reads_an_s3_workspace(s3_root: str, tmp_path: Path) -> None:
    from posttrain.paths import run_workspace
    from posttrain.summary import run_summary

    recipe = load_recipe(write_recipe(tmp_path, storage={"root": s3_root}))
    workspace = Store.at(run_workspace(s3_root, recipe.name, "manual__1"))
    (workspace / "train" / "summary.json").write_json({"steps": 4, "first_loss": 2.5, "last_loss": 1.25})
    (workspace / "eval" / "metrics.json").write_json({"eval_loss": 1.5})
    text = run_summary(recipe, "manual__1", {"train": "success"}, "success")
    assert f"workspace {workspace.uri}" in text and "loss 2.5000 → 1.2500" in text and "eval_loss 1.5000" in text


# The per-node model cache (posttrain/model_cache.py): s3:// models as transformers and vLLM load them.


@pytest.fixture
def model_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own node: POSTTRAIN_HOME (and so the cache) under tmp_path."""
    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path / "node"))
    monkeypatch.delenv("POSTTRAIN_MODEL_CACHE_GIB", raising=False)
    return tmp_path / "node"


@pytest.fixture
def object_gets(s3_root: str) -> Iterator[list[str]]:
    """The URL paths ('/key' or '/bucket/key') of every GetObject the environment's s3fs filesystem sends during
    the test (botocore's events; the filesystem is cached, so the model cache uses this one too)."""
    gets: list[str] = []

    def count(params: dict, **_: object) -> None:
        gets.append(params["url_path"])

    fs = Store.at(s3_root).fs
    fs.connect()
    fs.s3.meta.events.register("before-call.s3.GetObject", count)
    yield gets
    fs.s3.meta.events.unregister("before-call.s3.GetObject", count)


def _fetch_in_subprocess(*uris: str, bound_gib: float | None = None) -> list[str]:
    """model_cache.model_dir in a process of its own (its hold on the entries ends when it exits)."""
    import subprocess
    import sys

    env = {**os.environ, **({"POSTTRAIN_MODEL_CACHE_GIB": str(bound_gib)} if bound_gib else {})}
    code = "import sys; from posttrain import model_cache; [print(model_cache.model_dir(u)) for u in sys.argv[1:]]"
    out = subprocess.run([sys.executable, "-c", code, *uris], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_model_cache_hits_refetches_a_changed_model_and_serves_transformers(
        s3_root: str, tiny_model: Path, model_cache_home: Path, object_gets: list[str]) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from posttrain import model_cache, uris

    uri = f"{s3_root}/models/tiny"
    files = model_cache.upload(tiny_model, uri)
    assert "config.json" in files and (Store.at(uri) / COMMIT).exists()
    gets = object_gets
    first = uris.model_dir(uri)
    assert first.is_relative_to(model_cache_home / "cache" / "models")
    key = uri.removeprefix("s3://").split("/", 1)[1]
    assert sorted(g.rsplit(key, 1)[-1] for g in gets) == sorted(f"/{n}" for n in [COMMIT, *files])
    assert {p.name for p in first.iterdir()} >= set(files)
    gets.clear()
    assert uris.model_dir(uri) == first and gets == []  # the second fetch: one listing, no object read
    assert AutoConfig.from_pretrained(uris.model_location(uri)).vocab_size > 0
    assert len(AutoTokenizer.from_pretrained(uris.model_location(uri))) > 0 and gets == []
    # A new version (the commit marker is rewritten): a new entry with the new bytes.
    changed = tiny_model.parent / f"{tiny_model.name}-changed"
    shutil.copytree(tiny_model, changed, dirs_exist_ok=True)
    (changed / "generation_config.json").write_text('{"max_new_tokens": 3}')
    model_cache.upload(changed, uri)
    second = uris.model_dir(uri)
    assert second != first and (second / "generation_config.json").read_text() == '{"max_new_tokens": 3}'
    assert not list((model_cache_home / "cache" / "models").glob(".fetching-*"))
    # The plan check reads config.json alone.
    assert (uris.model_file(uri, "config.json") or Path()).read_text() == (changed / "config.json").read_text()
    assert uris.model_file(f"{s3_root}/models/none", "config.json") is None


def test_model_cache_takes_an_upload_without_commit_keyed_by_its_listing(s3_root: str, model_cache_home: Path) -> None:
    from posttrain import model_cache

    folder = Store.at(f"{s3_root}/models/user")
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "sub" / "weights.bin").write_bytes(b"w" * 1000)
    (Store.at(f"{folder.uri}2") / "other.bin").write_bytes(b"o")  # a sibling whose name extends this one
    entry = model_cache.model_dir(folder.uri)
    assert (entry / "sub" / "weights.bin").read_bytes() == b"w" * 1000 and not (entry / COMMIT).exists()
    assert sorted(p.name for p in entry.iterdir()) == [model_cache.ENTRY, "config.json", "sub"]
    assert model_cache.model_dir(folder.uri) == entry
    (folder / "sub" / "weights.bin").write_bytes(b"v" * 1000)  # same size, new ETag
    again = model_cache.model_dir(folder.uri)
    assert again != entry and (again / "sub" / "weights.bin").read_bytes() == b"v" * 1000
    with pytest.raises(FileNotFoundError, match="models/missing: no model here"):
        model_cache.model_dir(f"{s3_root}/models/missing")


def test_model_cache_evicts_the_least_recently_used_past_its_bound(s3_root: str, model_cache_home: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from posttrain import model_cache

    uris_ = []
    for name in "abc":
        local = model_cache_home.parent / "src" / name
        local.mkdir(parents=True)
        (local / "weights.bin").write_bytes(name.encode() * 400_000)
        uris_.append(f"{s3_root}/models/{name}")
        model_cache.upload(local, uris_[-1])
    a, b, c = uris_
    # Two processes fetch the same model at once: one entry, no partial download left.
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: _fetch_in_subprocess(a), range(2)))
    assert paths[0] == paths[1] and Path(paths[0][0]).is_dir()
    root = model_cache.cache_root()
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == [Path(paths[0][0]).name]
    # A bound of about two models: fetching b then c (in a process that ends) evicts a, the oldest.
    bound = 2.5 * 400_000 / 2**30
    entry_b, entry_c = map(Path, _fetch_in_subprocess(b, c, bound_gib=bound))
    assert not Path(paths[0][0]).exists() and entry_b.is_dir() and entry_c.is_dir()
    # An entry a live process holds is never evicted, whatever the bound.
    monkeypatch.setenv("POSTTRAIN_MODEL_CACHE_GIB", str(bound))
    held = model_cache.model_dir(b)  # this process now holds b; make it the least recently used
    os.utime(held / model_cache.ENTRY, (1, 1))
    entry_a = Path(_fetch_in_subprocess(a, bound_gib=bound)[0])
    assert held.is_dir() and entry_a.is_dir() and not entry_c.exists()
    # A local head's teardown clears the cache (model_cache.clear): all but what a live process holds.
    monkeypatch.setenv("POSTTRAIN_MODEL_CACHE_GIB", "0")
    assert model_cache.clear() == [entry_a.name]
    assert held.is_dir() and not entry_a.exists()
    with pytest.raises(ValueError, match="POSTTRAIN_MODEL_CACHE_GIB='0': the cache bound must be positive"):
        model_cache.model_dir(a)
