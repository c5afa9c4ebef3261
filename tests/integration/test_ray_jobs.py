"""The Ray job path on a real local head: loopback only, jobs watched by the trigger with their
log lines, failures carrying the job's error, and a stop that leaves no process behind."""

from __future__ import annotations

import asyncio
import importlib
from pathlib import Path
from typing import Any

import psutil
import pytest

from posttrain.hooks.local_ray import LocalRayCluster
from posttrain.hooks.ray import RayJobHook
from posttrain.triggers.ray import RayJobTrigger


@pytest.fixture(scope="module")
def cluster(ray_cluster: dict) -> dict:
    return ray_cluster


def run_trigger(trigger: RayJobTrigger) -> dict[str, Any]:
    async def first_event() -> dict[str, Any]:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    return asyncio.run(asyncio.wait_for(first_event(), timeout=120))


def test_head_listens_on_loopback_only(cluster: dict[str, Any]) -> None:
    listening = set()
    for proc in LocalRayCluster.processes(cluster):
        try:
            listening |= {c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            continue
    assert listening and listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening


def test_job_succeeds_and_the_trigger_streams_its_log(cluster: dict[str, Any], capfd) -> None:
    hook = RayJobHook(address=cluster["dashboard_url"], token_file=cluster["token_file"])
    job = hook.submit_job(f"{cluster['python']} -c \"print('hello from the job'); import ray; ray.init(); "
                          "print('cpus', ray.cluster_resources()['CPU'])\"", "ok-job")
    trigger = RayJobTrigger(job_id=job, address=cluster["dashboard_url"], token_file=cluster["token_file"],
                            poll_interval=0.5)
    event = run_trigger(trigger)
    assert event["status"] == "SUCCEEDED"
    assert "hello from the job" in event["log_tail"]
    out = capfd.readouterr()
    assert f"[ray job {job}] hello from the job" in out.out + out.err  # streamed into the task log


def test_failed_job_reports_its_error(cluster: dict[str, Any]) -> None:
    hook = RayJobHook(address=cluster["dashboard_url"], token_file=cluster["token_file"])
    job = hook.submit_job(f"{cluster['python']} -c \"raise SystemExit('training exploded at step 3')\"", "bad-job")
    event = run_trigger(RayJobTrigger(job_id=job, address=cluster["dashboard_url"],
                                      token_file=cluster["token_file"], poll_interval=0.5))
    assert event["status"] == "FAILED"
    assert "training exploded at step 3" in event["log_tail"]


def test_jobs_api_refuses_requests_without_the_cluster_token(cluster: dict[str, Any]) -> None:
    from posttrain.hooks.ray import RayJobError

    with pytest.raises(RayJobError, match="HTTP 401"):
        RayJobHook(address=cluster["dashboard_url"]).submit_job("echo hi", "no-token")


@pytest.mark.parametrize("trigger", [
    RayJobTrigger(job_id="j1", address="http://127.0.0.1:8265", token_file="/x/token", poll_interval=3.0),
    RayJobTrigger(job_id="j2", ray_conn_id="ray_prod"),
])
def test_trigger_serialization_round_trips(trigger: RayJobTrigger) -> None:
    path, kwargs = trigger.serialize()
    module, _, name = path.rpartition(".")
    again = getattr(importlib.import_module(module), name)(**kwargs)
    assert again.serialize() == (path, kwargs)


def test_existing_cluster_through_a_ray_connection(cluster: dict[str, Any], monkeypatch) -> None:
    """`compute.provider: ray`: the address and token come from an Airflow connection."""
    import json
    from pathlib import Path

    token = Path(cluster["token_file"]).read_text()
    monkeypatch.setenv("AIRFLOW_CONN_RAY_EXISTING", json.dumps(
        {"conn_type": "ray", "host": cluster["dashboard_url"], "password": token}))
    hook = RayJobHook(ray_conn_id="ray_existing")
    hook.wait_ready(timeout=10)
    job = hook.submit_job(f"{cluster['python']} -c \"print('via connection')\"", "conn-job")
    event = run_trigger(RayJobTrigger(job_id=job, ray_conn_id="ray_existing", poll_interval=0.5))
    assert event["status"] == "SUCCEEDED" and "via connection" in event["log_tail"]


def test_a_restarted_triggerer_picks_the_job_up_from_its_id(cluster: dict[str, Any]) -> None:
    """The first trigger dies mid-job (its task cancelled, as when the triggerer restarts); a new
    one built from the serialized kwargs alone follows the same job to its end, with the whole log."""
    hook = RayJobHook(address=cluster["dashboard_url"], token_file=cluster["token_file"])
    script = "import time; [(print(f'tick {i}', flush=True), time.sleep(1)) for i in range(6)]"
    job = hook.submit_job(f"{cluster['python']} -c \"{script}\"", "restart-job")
    first = RayJobTrigger(job_id=job, address=cluster["dashboard_url"], token_file=cluster["token_file"],
                          poll_interval=0.5)

    async def watch_then_die() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(first.run().__anext__(), timeout=2.5)

    asyncio.run(watch_then_die())
    assert hook.get_job(job)["status"] not in ("SUCCEEDED", "FAILED")  # still running when the watcher died
    path, kwargs = first.serialize()
    module, _, name = path.rpartition(".")
    event = run_trigger(getattr(importlib.import_module(module), name)(**kwargs))
    assert event["status"] == "SUCCEEDED" and event["job_id"] == job
    assert all(f"tick {i}" in event["log_tail"] for i in range(6))


def test_jobs_keep_their_temp_files_in_the_repo(cluster: dict[str, Any]) -> None:
    """Ray workers and job drivers inherit the test's TMPDIR (multiprocessing's pymp-* folders, vLLM's
    sockets): nothing lands in the system's /tmp."""
    from posttrain.paths import posttrain_home

    hook = RayJobHook(address=cluster["dashboard_url"], token_file=cluster["token_file"])
    job = hook.submit_job(f"{cluster['python']} -c \"import tempfile; print('tmp=' + tempfile.gettempdir())\"",
                          "tmpdir-job")
    event = run_trigger(RayJobTrigger(job_id=job, address=cluster["dashboard_url"], token_file=cluster["token_file"],
                                      poll_interval=0.5))
    assert event["status"] == "SUCCEEDED"
    assert f"tmp={posttrain_home() / 'tmp'}" in event["log_tail"]


def prepare_job(cluster: dict[str, Any], recipe: Any, workspace: Path, name: str) -> tuple[str, str]:
    """The prepare job as RayPrepareDataOperator submits it, with ranges small enough that the
    sample data is tokenized in many calls; its final status and logs."""
    import time

    from posttrain.hooks.ray import TERMINAL_STATES

    workspace.mkdir()
    (workspace / "recipe.json").write_text(recipe.model_dump_json())
    hook = RayJobHook(address=cluster["dashboard_url"], token_file=cluster["token_file"])
    job = hook.submit_job(f"{cluster['python']} -m posttrain.training_lib.entrypoint prepare "
                          f"--workspace file://{workspace} --chunk-bytes 4096", name, entrypoint_num_cpus=0)
    deadline = time.monotonic() + 180
    while (status := hook.get_job(job)["status"]) not in TERMINAL_STATES:
        assert time.monotonic() < deadline, "the prepare job did not finish in 180 s"
        time.sleep(0.5)
    return status, hook.get_job_logs(job)


@pytest.mark.parametrize("data_format", ["chat", "preference"])
def test_prepare_on_ray_writes_the_local_bytes(cluster: dict[str, Any], tmp_path, tiny_model, data_format: str) -> None:
    """`data.prepare: ray`: the prepare job (as RayPrepareDataOperator submits it, with ranges small
    enough that the sample data is tokenized in many calls) writes the manifest and shards
    the local prepare writes, byte for byte: chat conversations, and preference pairs (prompts take
    the same path; tests/unit/test_ray_prepare_plan.py covers both without Ray)."""
    import filecmp
    import json

    from posttrain.prep.prepare import prepare
    from posttrain.recipe import load_recipe
    from tests.conftest import REPO, write_recipe

    if data_format == "chat":
        recipe = load_recipe(write_recipe(tmp_path, name="ray-prep", data={"prepare": "ray"}))
    else:
        pairs = REPO / "dags" / "data" / "tiny-preference"
        recipe = load_recipe(write_recipe(tmp_path, name="ray-prep", paradigm="dpo", data={
            "prepare": "ray", "format": "preference", "train": str(pairs / "train.jsonl"),
            "eval": str(pairs / "eval.jsonl")}))
    prepare(recipe, tmp_path / "local")
    workspace = tmp_path / "on-ray"
    status, logs = prepare_job(cluster, recipe, workspace, f"prepare-on-ray-{data_format}")
    assert status == "SUCCEEDED", logs[-3000:]
    assert "posttrain prepare finished" in logs
    local = sorted(p.name for p in (tmp_path / "local" / "data").iterdir())
    assert sorted(p.name for p in (workspace / "data").iterdir()) == local
    assert "manifest.json" in local and len(local) == 3
    for name in local:
        assert filecmp.cmp(tmp_path / "local" / "data" / name, workspace / "data" / name, shallow=False), name
    manifest = json.loads((workspace / "data" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == 400


def test_prepare_on_ray_refuses_a_teacher_of_another_tokenizer(cluster: dict[str, Any], tmp_path, tiny_model,
                                                             tiny_teacher) -> None:
    """The Ray prepare's driver never loads the tokenizer (its workers report the fingerprint): a
    distillation teacher whose tokenizer differs is still refused, with both fingerprints, before
    any shard is written."""
    import shutil

    from posttrain.prep.prepare import tokenizer_facts
    from posttrain.prep.tokenizer import load_tokenizer
    from posttrain.recipe import load_recipe
    from tests.conftest import write_recipe

    other = tmp_path / "other-teacher"
    shutil.copytree(tiny_teacher, other)
    template = other / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    recipe = load_recipe(write_recipe(tmp_path, name="kd-ray-prep", paradigm="kd", data={"prepare": "ray"},
                                      kd={"teacher": str(other), "weight": 1.0}))
    workspace = tmp_path / "on-ray"
    status, logs = prepare_job(cluster, recipe, workspace, "prepare-on-ray-kd")
    assert status == "FAILED", logs[-3000:]
    student = tokenizer_facts(load_tokenizer(recipe.tokenizer_uri))["fingerprint"]
    assert f"TokenizerMismatch: kd.teacher file://{other}: its tokenizer has fingerprint " in logs
    assert f"has {student}; distillation needs the same tokenizer" in logs
    assert not list(workspace.rglob("*.parquet")) and not (workspace / "data" / "manifest.json").exists()


def test_a_submission_waits_out_a_dashboard_that_is_not_ready(cluster: dict[str, Any]) -> None:
    """A head whose job agent is not up yet (or a dashboard behind a restarting load balancer)
    answers submissions with HTTP 5xx for a while: the job tasks submit again with backoff instead of
    failing, and never submit the same job twice."""
    import threading
    import time

    from posttrain.hooks.ray import TERMINAL_STATES
    from tests.deployment.flaky_proxy import FlakyProxy

    proxy = FlakyProxy(cluster["dashboard_url"]).start()
    try:
        hook = RayJobHook(address=proxy.url, token_file=cluster["token_file"])
        entrypoint = f"{cluster['python']} -c \"print('submitted once')\""
        proxy.fail(True)
        recovers = threading.Timer(3.0, proxy.fail, args=(False,))
        recovers.start()
        assert hook.ensure_submitted(entrypoint, "submit-when-ready", retry_window_s=60)
        assert proxy.refused > 0  # it was refused, and asked again
        assert not hook.ensure_submitted(entrypoint, "submit-when-ready", retry_window_s=60)  # there already
        deadline = time.monotonic() + 60
        while (status := hook.get_job("submit-when-ready")["status"]) not in TERMINAL_STATES:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert status == "SUCCEEDED"
        assert hook.get_job_logs("submit-when-ready").splitlines().count("submitted once") == 1
    finally:
        recovers.cancel()
        proxy.stop()


def test_a_head_whose_port_was_taken_meanwhile_is_started_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The head's ports are picked free and released for `ray start`: when another process takes
    one in between (here the dashboard agent's HTTP port, which Ray survives without: every job
    submission would then fail "No available agent to submit job"), the head is started again on
    fresh ports, and jobs run on it."""
    import socket
    import time

    from posttrain.hooks import local_ray
    from posttrain.hooks.ray import TERMINAL_STATES

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    picks: list[list[int]] = []
    real_free_ports = local_ray.free_ports

    def free_ports(count: int) -> list[int]:
        ports = real_free_ports(count)
        if not picks:  # the first head gets the taken port for its agent's HTTP server
            ports[2] = squatter.getsockname()[1]
        picks.append(ports)
        return ports

    monkeypatch.setattr(local_ray, "free_ports", free_ports)
    info = LocalRayCluster.start(num_cpus=1)
    try:
        assert len(picks) == 2 and info["dashboard_url"].endswith(f":{picks[1][1]}")
        hook = RayJobHook(address=info["dashboard_url"], token_file=info["token_file"])
        job = hook.submit_job(f"{info['python']} -c \"print('on the second head')\"", "after-port-taken")
        deadline = time.monotonic() + 60
        while (status := hook.get_job(job)["status"]) not in TERMINAL_STATES:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert status == "SUCCEEDED"
    finally:
        LocalRayCluster.stop(info)
        squatter.close()
    assert LocalRayCluster.processes(info) == []
