"""The training job on a local Ray head, as the operators submit it (streaming packing, 2 FSDP2
workers): a run killed mid-way and submitted again (what an Airflow retry does), and a run that
loses a Ray Train worker mid-way, both resume from their last checkpoint and end exactly where an
uninterrupted run ends: same loss at every step, same final weights, bit for bit (a custom head's too)."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from posttrain.hooks.local_ray import LocalRayCluster
from posttrain.hooks.ray import TERMINAL_STATES, RayJobHook
from posttrain.prep.prepare import prepare
from posttrain.recipe import load_recipe
from tests.conftest import write_recipe

ENTRY = "{python} -m posttrain.training_lib.entrypoint train --workspace file://{ws}"


def submit(hook: RayJobHook, cluster: dict, workspace: Path, job_id: str) -> str:
    return hook.submit_job(ENTRY.format(python=cluster["python"], ws=workspace), job_id)


def wait(hook: RayJobHook, job_id: str, timeout: float = 300) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while (status := hook.get_job(job_id)["status"]) not in TERMINAL_STATES:
        assert time.monotonic() < deadline, f"job {job_id} did not finish in {timeout:.0f} s"
        time.sleep(0.5)
    return status, hook.get_job_logs(job_id)


def losses(workspace: Path) -> dict[int, float]:
    """Loss per step; a step logged twice (before a kill, again after the resume) keeps its last value."""
    rows = [json.loads(x) for x in (workspace / "train" / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def new_workspace(root: Path, recipe) -> Path:
    root.mkdir()
    (root / "recipe.json").write_text(recipe.model_dump_json())
    prepare(recipe, root)
    return root


@pytest.fixture(scope="module")
def cluster(ray_cluster: dict) -> dict:
    return ray_cluster


def wait_for(path: Path, hook: RayJobHook, job: str, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline and hook.get_job(job)["status"] not in TERMINAL_STATES
        time.sleep(0.1)


def train_workers(cluster: dict) -> list[psutil.Process]:
    return [p for p in LocalRayCluster.processes(cluster)
            if "RayTrainWorker" in " ".join(p.cmdline() if p.is_running() else [])]


HEAD = "tests.fixtures.heads_example:ResidualProjection"


def test_killed_run_resumes_exactly(tmp_path: Path, tiny_model: Path, cluster: dict) -> None:
    steps = 40
    # With a custom head: its weights and optimizer state resume exactly too (DCP).
    recipe = load_recipe(write_recipe(
        tmp_path, name="resume", data={"packing": {"mode": "streaming", "buffer_docs": 64}},
        model={"base": str(tiny_model), "components": {"head": HEAD}},
        training={"max_steps": steps, "checkpoint_every": 5, "keep_checkpoints": 2, "learning_rate": 1e-3}))
    straight = new_workspace(tmp_path / "straight", recipe)
    interrupted = new_workspace(tmp_path / "interrupted", recipe)
    worker_lost = new_workspace(tmp_path / "worker-lost", recipe)
    assert json.loads((straight / "data" / "manifest.json").read_text())["splits"]["train"]["layout"] == "documents"

    hook = RayJobHook(address=cluster["dashboard_url"], token_file=cluster["token_file"])
    status, logs = wait(hook, submit(hook, cluster, straight, "straight"))
    assert status == "SUCCEEDED", logs[-3000:]

    job = submit(hook, cluster, interrupted, "killed")
    wait_for(interrupted / "checkpoints" / "step-00000005" / "commit.json", hook, job)
    hook.stop_job(job)
    status, _ = wait(hook, job)
    assert status == "STOPPED"
    # Complete checkpoints only: the job may have been stopped while it wrote the next one.
    resumed_at = max(int(p.parent.name[len("step-"):])
                     for p in (interrupted / "checkpoints").glob("step-*/commit.json"))
    assert resumed_at < steps, "the job finished before it could be killed; nothing was resumed"

    status, logs = wait(hook, submit(hook, cluster, interrupted, "resumed"))
    assert status == "SUCCEEDED", logs[-3000:]
    # The job names its checkpoint by the workspace URI (file:// here, s3:// in a bucket).
    assert f"resumed from file://{interrupted}/checkpoints/step-{resumed_at:08d} at step {resumed_at}" in logs

    # One Ray Train worker dies mid-run: FailureConfig restarts the group, which resumes from the
    # last checkpoint inside the same job.
    job = submit(hook, cluster, worker_lost, "worker-lost")
    wait_for(worker_lost / "checkpoints" / "step-00000005" / "commit.json", hook, job)
    victims = train_workers(cluster)
    assert len(victims) == 2, [p.cmdline() for p in victims]
    victims[1].kill()
    status, logs = wait(hook, job)
    assert status == "SUCCEEDED", logs[-3000:]
    assert "resumed from" in logs

    assert losses(interrupted) == losses(straight) == losses(worker_lost)
    assert sorted(losses(straight)) == list(range(1, steps + 1))
    for weights in ("model.safetensors", "components/head.safetensors"):
        a = load_file(straight / "model" / weights)
        for other in (interrupted, worker_lost):
            b = load_file(other / "model" / weights)
            assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_lora_under_fsdp_trains_only_the_adapters_and_the_custom_head(tmp_path: Path, tiny_model: Path,
                                                                      cluster: dict) -> None:
    """LoRA (PEFT) on 2 FSDP2 workers with activation checkpointing and a custom head
    (`model.components.head`, tests/fixtures/heads_example.py): only the adapter weights and the head
    train, the export holds the adapter, the merged model and the head (components/), merging changed
    only the targeted layers, and the export reloaded with its head scores the eval set exactly as
    the trained model of the last checkpoint does (and not as the export without its head)."""
    recipe = load_recipe(write_recipe(
        tmp_path, name="lora", model={"base": str(tiny_model), "lora": {"rank": 4, "alpha": 8, "dropout": 0.0,
                                                                      "target_modules": ["q_proj", "v_proj"]},
                                      "components": {"head": HEAD}},
        training={"max_steps": 6, "learning_rate": 5e-3, "checkpoint_every": 3, "activation_checkpointing": True}))
    workspace = new_workspace(tmp_path / "ws", recipe)
    hook = RayJobHook(address=cluster["dashboard_url"], token_file=cluster["token_file"])
    status, logs = wait(hook, submit(hook, cluster, workspace, "lora"))
    assert status == "SUCCEEDED", logs[-3000:]

    # 2 layers × (q_proj + v_proj) × (A: 4×64 + B: 64×4) adapter weights, and the head's 64×64 + 64.
    assert f"{2048 + 64 * 64 + 64} trainable parameters" in logs and '"activation_checkpointing": true' in logs
    adapter = load_file(workspace / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 8 and all("lora_" in k for k in adapter)
    base, merged = load_file(tiny_model / "model.safetensors"), load_file(workspace / "model" / "model.safetensors")
    assert base.keys() == merged.keys()
    changed = {k for k in base if not base[k].equal(merged[k])}
    assert changed == {f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")}
    loss = losses(workspace)
    assert all(math.isfinite(v) for v in loss.values()) and loss[6] < loss[1], loss
    assert_head_trained_and_exported(recipe, workspace)


def assert_head_trained_and_exported(recipe, workspace: Path) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from posttrain.training_lib.data.loader import read_blocks
    from posttrain.training_lib.evaluation.loss import eval_loss
    from posttrain.training_lib.evaluation.run import run as evaluate
    from posttrain.training_lib.models.components import initial_head, training_model

    for folder in ("model", "adapter"):
        index = json.loads((workspace / folder / "components" / "components.json").read_text())
        assert index["head"]["class"] == HEAD and (workspace / folder / "components" / "README.md").exists()
    trained = load_file(workspace / "model" / "components" / "head.safetensors")
    reference = training_model(recipe)  # the single-process model, with the head as training starts it
    start = initial_head(recipe, reference.lm.get_base_model().config).state_dict()
    assert trained.keys() == start.keys() and all(not trained[k].equal(start[k]) for k in trained)

    # The trained model itself: the last checkpoint (DCP, written by the 2 FSDP2 ranks) in one process.
    state = get_model_state_dict(reference)
    dcp.load({"model": state}, checkpoint_id=str(workspace / "checkpoints" / "step-00000006"))
    set_model_state_dict(reference, state)
    assert all(reference.head.state_dict()[k].equal(trained[k]) for k in trained)
    blocks = read_blocks(workspace, "eval")
    with torch.no_grad():
        total = sum(float(reference(**{k: v[i:i + 4] for k, v in blocks.items()}))
                    for i in range(0, blocks["input_ids"].shape[0], 4))
    scored, _ = eval_loss(workspace / "model", workspace)  # the export + its head, as evaluate loads them
    assert abs(scored["eval_loss"] * scored["eval_tokens"] - total) <= 1e-4 * total, (scored, total)
    shutil.copytree(workspace / "model", workspace / "headless")
    shutil.rmtree(workspace / "headless" / "components")
    without, _ = eval_loss(workspace / "headless", workspace)
    assert abs(without["eval_loss"] - scored["eval_loss"]) > 1e-3, (without, scored)
    # The evaluate stage: eval_loss with the head, no vLLM generations of a model without it.
    metrics = evaluate(recipe, workspace)
    assert metrics == scored and not (workspace / "eval" / "samples.jsonl").read_text()


def test_tensor_parallel_job_resumes_and_tracks_the_single_worker_run(tmp_path: Path, tiny_model: Path,
                                                                      cluster: dict) -> None:
    """2 workers as one tensor-parallel group (dp 1 × tp 2) see the same batches as 1 worker alone,
    so their losses must agree step by step; the TP job is stopped after 3 steps and resumed from
    its (dp, tp)-sharded checkpoint. Metrics reach MLflow's sqlite store under the storage root."""
    training = {"max_steps": 6, "checkpoint_every": 3, "lr_schedule": "constant", "learning_rate": 3e-3}
    single = load_recipe(write_recipe(tmp_path / "one", name="one", training=training, compute={"workers": 1}))
    tp = load_recipe(write_recipe(tmp_path / "tp", name="tp", compute={"workers": 2},
                                  training={**training, "max_steps": 3, "tensor_parallel": 2},
                                  tracking={"peak_tflops": 1.0}))
    hook = RayJobHook(address=cluster["dashboard_url"], token_file=cluster["token_file"])
    one_ws, tp_ws = new_workspace(tmp_path / "one-ws", single), new_workspace(tmp_path / "tp-ws", tp)
    status, logs = wait(hook, submit(hook, cluster, one_ws, "single"))
    assert status == "SUCCEEDED", logs[-3000:]
    status, logs = wait(hook, submit(hook, cluster, tp_ws, "tp-first-half"))
    assert status == "SUCCEEDED", logs[-3000:]
    assert '"strategy": "fsdp_tp"' in logs and '"tensor_parallel": 2' in logs
    # Same run, longer: what a retry with a raised max_steps does; it continues from step 3.
    (tp_ws / "recipe.json").write_text(tp.model_copy(update={"training": tp.training.model_copy(
        update={"max_steps": 6})}).model_dump_json())
    status, logs = wait(hook, submit(hook, cluster, tp_ws, "tp-second-half"))
    assert status == "SUCCEEDED", logs[-3000:]
    assert "at step 3" in logs

    want, got = losses(one_ws), losses(tp_ws)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    assert all(abs(got[s] - want[s]) < 1e-4 for s in want), (got, want)
    a, b = load_file(one_ws / "model" / "model.safetensors"), load_file(tp_ws / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-4 for k in a)

    rows = [json.loads(x) for x in (tp_ws / "train" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mfu"] is not None and r["mfu"] > 0 for r in rows)
    from mlflow.tracking import MlflowClient

    db = Path(tp.storage.root.removeprefix("file://")) / "tp" / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("tp").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(1, 7))


def test_adapter_only_export_is_evaluated_through_a_scratch_merge(tmp_path: Path, tiny_model: Path,
                                                                   cluster: dict) -> None:
    """`lora.merge_on_export: false`: the job exports the adapter alone (no full model copy per run);
    the evaluate job merges it with the base in a scratch folder for vLLM and removes it after."""
    recipe = load_recipe(write_recipe(
        tmp_path, name="adapter-only", training={"max_steps": 2, "checkpoint_every": 2},
        model={"base": str(tiny_model), "lora": {"rank": 4, "merge_on_export": False}}))
    workspace = new_workspace(tmp_path / "ws", recipe)
    hook = RayJobHook(address=cluster["dashboard_url"], token_file=cluster["token_file"])
    status, logs = wait(hook, submit(hook, cluster, workspace, "adapter-only"))
    assert status == "SUCCEEDED", logs[-3000:]
    assert (workspace / "adapter" / "adapter_model.safetensors").exists() and not (workspace / "model").exists()
    evaluate = ENTRY.replace(" train ", " evaluate ").format(python=cluster["python"], ws=workspace)
    status, logs = wait(hook, hook.submit_job(evaluate, "adapter-only-eval"))
    assert status == "SUCCEEDED", logs[-3000:]
    metrics = json.loads((workspace / "eval" / "metrics.json").read_text())
    assert metrics["eval_loss"] > 0 and "exact_match" in metrics
    assert not (workspace / "eval" / "merged").exists()
