"""DPO, KD and GRPO each run once through their job (a Ray job on a local head, 2 FSDP2 workers) on
the tiny Qwen3: a real chat template that rewrites earlier turns, `<|im_end|>` ending replies, a
tied embedding and a vocabulary padded at load (437 → 448 rows). Few steps each: the point is that
the family goes through every paradigm's code, not how far it learns (test_dpo/kd/grpo_job do that).
On the same head: the train and evaluate jobs refuse a tokenizer other than the data's."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from posttrain.hooks.ray import RayJobHook
from posttrain.recipe import load_recipe
from tests.conftest import tiny_family, write_recipe
from tests.integration.test_dpo_job import dpo_recipe
from tests.integration.test_grpo_job import grpo_recipe
from tests.integration.test_kd_job import kd_recipe
from tests.integration.test_training_job import new_workspace, submit, wait


def _run(ray_cluster: dict, workspace: Path, job: str) -> list[dict]:
    hook = RayJobHook(address=ray_cluster["dashboard_url"], token_file=ray_cluster["token_file"])
    status, logs = wait(hook, submit(hook, ray_cluster, workspace, job), timeout=600)
    assert status == "SUCCEEDED", logs[-4000:]
    rows = [json.loads(x) for x in (workspace / "train" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    config = json.loads((workspace / "model" / "config.json").read_text())
    # Trained with 448 rows, exported with the checkpoint's 437: no padding row reaches a server.
    assert config["model_type"] == "qwen3" and config["vocab_size"] == 437 and "unpadded_vocab_size" not in config
    return rows


@pytest.fixture(scope="module")
def qwen3() -> Path:
    return tiny_family("qwen3")


@pytest.mark.slow
def test_dpo_job_on_qwen3(tmp_path: Path, qwen3: Path, ray_cluster: dict) -> None:
    recipe = dpo_recipe(tmp_path, "dpo-qwen3", train_pairs=16, model={"base": str(qwen3)},
                        training={"max_steps": 4, "learning_rate": 1e-3, "micro_batch_size": 8, "checkpoint_every": 4})
    rows = _run(ray_cluster, new_workspace(tmp_path / "ws", recipe), "dpo-qwen3")
    # The policy is its own reference before the first update: the padded rows don't change that.
    assert rows[0]["rewards/chosen"] == 0.0 and rows[0]["rewards/rejected"] == 0.0


@pytest.mark.slow
def test_kd_job_on_qwen3(tmp_path: Path, qwen3: Path, ray_cluster: dict) -> None:
    from posttrain.training_lib.models.tiny import build_tiny

    teacher = build_tiny(tmp_path / "teacher", seed=1, family_name="qwen3")  # same tokenizer, other weights
    recipe = kd_recipe(tmp_path, teacher)
    recipe = recipe.model_copy(update={
        "name": "kd-qwen3", "model": recipe.model.model_copy(update={"base": f"file://{qwen3}"}),
        "training": recipe.training.model_copy(update={"max_steps": 4, "checkpoint_every": 4})})
    rows = _run(ray_cluster, new_workspace(tmp_path / "ws", recipe), "kd-qwen3")
    assert all(math.isfinite(r["kd/forward_kl"]) and r["kd/forward_kl"] > 0 for r in rows)


@pytest.mark.slow
def test_grpo_job_on_qwen3(tmp_path: Path, qwen3: Path, ray_cluster: dict) -> None:
    recipe = grpo_recipe(tmp_path, qwen3, "grpo-qwen3", 3)
    rows = _run(ray_cluster, new_workspace(tmp_path / "ws", recipe), "grpo-qwen3")
    # vLLM, restricted to the 437 real tokens, runs exactly the policy the trainer holds after a sync.
    for r in (rows[0], rows[-1]):
        assert r["sync/max_abs_logprob_diff"] < 1e-3


def _normalizer_changed(model: Path, to: Path) -> Path:
    """A copy of `model` whose tokenizer differs only in its normalizer (NFKC): the same vocabulary,
    merges, template and special tokens, yet "ﬁ" and "fi" now become the same ids."""
    shutil.copytree(model, to)
    spec = json.loads((to / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "NFKC"}
    (to / "tokenizer.json").write_text(json.dumps(spec))
    return to


@pytest.mark.slow
def test_train_and_evaluate_jobs_refuse_another_tokenizer(tmp_path: Path, tiny_model: Path,
                                                          ray_cluster: dict) -> None:
    from posttrain.prep.tokenizer import load_tokenizer, tokenizer_fingerprint

    recipe = load_recipe(write_recipe(tmp_path, name="tok"))
    workspace = new_workspace(tmp_path / "ws", recipe)  # data prepared with the tiny model's tokenizer
    other = _normalizer_changed(tiny_model, tmp_path / "other")
    prepared, actual = tokenizer_fingerprint(load_tokenizer(str(tiny_model))), tokenizer_fingerprint(
        load_tokenizer(str(other)))
    assert prepared != actual
    # The recipe now names the other tokenizer (as an edited recipe on a retried run would).
    changed = recipe.model_copy(update={"model": recipe.model.model_copy(update={"tokenizer": str(other)})})
    (workspace / "recipe.json").write_text(changed.model_dump_json())
    hook = RayJobHook(address=ray_cluster["dashboard_url"], token_file=ray_cluster["token_file"])
    status, logs = wait(hook, submit(hook, ray_cluster, workspace, "tok-train"))
    assert status == "FAILED"
    assert f"TokenizerMismatch: tokenizer at {other} has fingerprint {actual}, but file://{workspace}/data " \
           f"was prepared with {prepared}" in logs, logs[-3000:]
    # Refused in the driver, before any worker trained a step or wrote a checkpoint.
    assert not (workspace / "train").exists() and not (workspace / "checkpoints").exists()

    # The evaluate job, on an export whose tokenizer is the other one.
    (workspace / "recipe.json").write_text(recipe.model_dump_json())
    _normalizer_changed(tiny_model, workspace / "model")
    job = hook.submit_job(f"{ray_cluster['python']} -m posttrain.training_lib.entrypoint evaluate "
                          f"--workspace file://{workspace}", "tok-evaluate")
    status, logs = wait(hook, job)
    assert status == "FAILED"
    assert f"has fingerprint {actual}, but file://{workspace}/data was prepared with {prepared}" in logs, logs[-3000:]
    assert not (workspace / "eval" / "metrics.json").exists()
