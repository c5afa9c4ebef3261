"""GRPO on the tiny model as the operators run it: a Ray job whose driver is the controller, with
2 FSDP2 policy actors, a vLLM engine on the CPU and a reward actor on a local Ray head. The format
reward's mean rises within a bounded number of steps, the engine scores a completion as the policy
does after each weight sync, and a job stopped mid-way resumes (policy, optimizer, prompt cursor)
and samples exactly what the uninterrupted job samples. A policy actor that dies fails the job at
once, naming the actor, and the resubmitted job resumes from the last checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from posttrain.hooks.local_ray import LocalRayCluster
from posttrain.hooks.ray import RayJobHook
from posttrain.recipe import load_recipe
from tests.conftest import REPO, write_recipe
from tests.integration.test_training_job import new_workspace, submit, wait, wait_for

PROMPTS = REPO / "dags" / "data" / "tiny-prompts"


def grpo_recipe(folder: Path, teacher: Path, name: str, steps: int, **grpo):  # noqa: ANN003, ANN201
    return load_recipe(write_recipe(
        folder, name=name, paradigm="grpo", model={"base": str(teacher)},
        data={"format": "prompt", "train": str(PROMPTS / "train.jsonl"), "eval": str(PROMPTS / "eval.jsonl"),
              "max_seq_len": 128},
        grpo={"group_size": 8, "prompts_per_step": 4, "max_new_tokens": 16, "kl_beta": 0.02,
              "rewards": [{"name": "regex", "params": {"pattern": "^The "}, "label": "starts_with_the"}], **grpo},
        training={"max_steps": steps, "learning_rate": 2e-3, "micro_batch_size": 16, "checkpoint_every": 5},
        evaluation={"metrics": ["reward_mean"], "max_samples": 16}))


def records(workspace: Path) -> list[dict]:
    return [json.loads(x) for x in (workspace / "train" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_grpo_reward_rises(tmp_path: Path, tiny_teacher: Path, ray_cluster: dict) -> None:
    workspace = new_workspace(tmp_path / "ws", grpo_recipe(tmp_path, tiny_teacher, "grpo-rise", 20))
    hook = RayJobHook(address=ray_cluster["dashboard_url"], token_file=ray_cluster["token_file"])
    status, logs = wait(hook, submit(hook, ray_cluster, workspace, "grpo-rise"), timeout=600)
    assert status == "SUCCEEDED", logs[-4000:]
    rows = records(workspace)
    curve = [round(r["reward/mean"], 3) for r in rows]
    print("GRPO reward per step:", curve)
    first, last = sum(curve[:4]) / 4, sum(curve[-4:]) / 4
    assert last > first + 0.25, (first, last)
    for r in (rows[0], rows[-1]):  # the engine runs the policy after a sync
        assert r["sync/max_abs_logprob_diff"] < 1e-3
    assert all(r["clip_fraction"] == 0.0 for r in rows)  # on-policy: the ratio is 1 at the only update
    assert {"kl", "rollout_tokens_per_s", "update_s", "rollout_s", "reward/starts_with_the"} <= set(rows[-1])
    assert (workspace / "model" / "model.safetensors").exists()


@pytest.mark.slow
def test_grpo_stopped_job_resumes_exactly(tmp_path: Path, tiny_teacher: Path, ray_cluster: dict) -> None:
    recipe = grpo_recipe(tmp_path, tiny_teacher, "grpo-resume", 10)
    straight, stopped = new_workspace(tmp_path / "straight", recipe), new_workspace(tmp_path / "stopped", recipe)
    hook = RayJobHook(address=ray_cluster["dashboard_url"], token_file=ray_cluster["token_file"])
    status, logs = wait(hook, submit(hook, ray_cluster, straight, "grpo-straight"), timeout=600)
    assert status == "SUCCEEDED", logs[-4000:]

    job = submit(hook, ray_cluster, stopped, "grpo-stopped")
    wait_for(stopped / "checkpoints" / "step-00000005" / "commit.json", hook, job, timeout=300)
    hook.stop_job(job)
    assert wait(hook, job)[0] == "STOPPED"
    status, logs = wait(hook, submit(hook, ray_cluster, stopped, "grpo-resumed"), timeout=600)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "resumed from step 5 (prompt 20)" in logs

    def by_step(ws: Path) -> dict[int, tuple]:
        return {r["step"]: (r["reward/mean"], r["loss"], r["completion_len"]) for r in records(ws)}

    assert by_step(stopped) == by_step(straight) and sorted(by_step(straight)) == list(range(1, 11))


@pytest.mark.slow
def test_grpo_with_lora_syncs_adapters_and_overlaps_rollouts(tmp_path: Path, tiny_teacher: Path,
                                                             ray_cluster: dict) -> None:
    from posttrain.recipe import LoraConfig

    recipe = grpo_recipe(tmp_path, tiny_teacher, "grpo-lora", 6, staleness=1)
    recipe.model.lora = LoraConfig(rank=8, alpha=16)
    workspace = new_workspace(tmp_path / "ws", recipe)
    hook = RayJobHook(address=ray_cluster["dashboard_url"], token_file=ray_cluster["token_file"])
    status, logs = wait(hook, submit(hook, ray_cluster, workspace, "grpo-lora"), timeout=600)
    assert status == "SUCCEEDED", logs[-4000:]
    rows = records(workspace)
    assert rows[0]["sync/max_abs_logprob_diff"] < 1e-3 and rows[-1]["sync/max_abs_logprob_diff"] < 1e-3
    # From step 2 on each batch was sampled while the previous update ran: one version behind.
    assert [r["stale"] for r in rows] == [0.0] + [1.0] * 5
    assert (workspace / "adapter").exists()


@pytest.mark.slow
def test_a_dead_policy_actor_fails_the_job_at_once_and_a_retry_resumes(tmp_path: Path, tiny_teacher: Path,
                                                                        ray_cluster: dict) -> None:
    """Its peer would wait for it in a collective until the process group times out (30 minutes):
    the controller fails the job as soon as Ray reports the actor gone, naming it."""
    recipe = grpo_recipe(tmp_path, tiny_teacher, "grpo-actor-dies", 10)
    workspace = new_workspace(tmp_path / "ws", recipe)
    hook = RayJobHook(address=ray_cluster["dashboard_url"], token_file=ray_cluster["token_file"])
    job = submit(hook, ray_cluster, workspace, "grpo-actor-dies")
    wait_for(workspace / "checkpoints" / "step-00000005" / "commit.json", hook, job, timeout=300)
    actors = [p for p in LocalRayCluster.processes(ray_cluster)
              if "ray::PolicyWorker" in " ".join(p.cmdline() if p.is_running() else [])]
    assert len(actors) == 2, [p.cmdline() for p in actors]
    actors[1].kill()
    killed_at = time.monotonic()
    status, logs = wait(hook, job, timeout=120)
    assert status == "FAILED", logs[-3000:]
    assert time.monotonic() - killed_at < 90
    assert "GRPO policy actor rank" in logs and "resubmitting it resumes from the newest complete checkpoint" in logs
    psutil.wait_procs(actors, timeout=30)

    status, logs = wait(hook, submit(hook, ray_cluster, workspace, "grpo-actor-dies-retry"), timeout=600)
    assert status == "SUCCEEDED", logs[-4000:]
    assert "resumed from step 5 (prompt 20)" in logs
    assert sorted({r["step"] for r in records(workspace)}) == list(range(1, 11))
