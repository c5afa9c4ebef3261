"""DPO on the tiny model as the operators run it (a Ray job on a local head, 2 FSDP2 workers):
preference accuracy on the train pairs rises, rewards start at exactly 0 (the policy is its own
reference before the first update), and with LoRA the reference is the base model with the
adapters disabled, computed on the fly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.hooks.ray import RayJobHook
from posttrain.recipe import load_recipe
from tests.conftest import REPO, write_recipe
from tests.integration.test_training_job import new_workspace, submit, wait

PAIRS = REPO / "dags" / "data" / "tiny-preference"


def dpo_recipe(folder: Path, name: str, train_pairs: int = 32, **sections):  # noqa: ANN003, ANN201
    """A DPO recipe on the first `train_pairs` sample pairs: few enough that a few dozen steps see
    each pair many times (the tiny model can't learn arithmetic, but it can learn these pairs)."""
    folder.mkdir(parents=True, exist_ok=True)
    train = folder / "pairs.jsonl"
    train.write_text("".join((PAIRS / "train.jsonl").read_text().splitlines(keepends=True)[:train_pairs]))
    return load_recipe(write_recipe(
        folder, name=name, paradigm="dpo",
        data={"format": "preference", "train": str(train), "eval": str(PAIRS / "eval.jsonl"), "max_seq_len": 128},
        evaluation={"metrics": ["preference_accuracy", "reward_margin", "dpo_loss"]}, **sections))


def records(workspace: Path) -> list[dict]:
    return [json.loads(x) for x in (workspace / "train" / "metrics.jsonl").read_text().splitlines()]


def mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


@pytest.mark.slow
def test_dpo_preference_accuracy_rises(tmp_path: Path, tiny_model: Path, ray_cluster: dict) -> None:
    recipe = dpo_recipe(tmp_path, "dpo-acc", training={"max_steps": 40, "learning_rate": 1e-3, "micro_batch_size": 8,
                                                       "checkpoint_every": 20, "warmup_steps": 2})
    workspace = new_workspace(tmp_path / "ws", recipe)
    hook = RayJobHook(address=ray_cluster["dashboard_url"], token_file=ray_cluster["token_file"])
    status, logs = wait(hook, submit(hook, ray_cluster, workspace, "dpo-acc"))
    assert status == "SUCCEEDED", logs[-3000:]
    rows = records(workspace)
    print("DPO accuracy per step:", [round(r["rewards/accuracy"], 3) for r in rows])
    assert rows[0]["rewards/chosen"] == 0.0 and rows[0]["rewards/rejected"] == 0.0
    assert (workspace / "train" / "reference_logps.pt").exists()
    first, last = mean(rows[:5], "rewards/accuracy"), mean(rows[-5:], "rewards/accuracy")
    assert last > first + 0.2 and last > 0.8, (first, last)
    assert mean(rows[-5:], "rewards/margin") > 0


@pytest.mark.slow
def test_dpo_with_lora_scores_the_reference_with_adapters_off(tmp_path: Path, tiny_model: Path,
                                                              ray_cluster: dict) -> None:
    recipe = dpo_recipe(tmp_path, "dpo-lora", model={"base": str(tiny_model), "lora": {"rank": 8, "alpha": 16}},
                        dpo={"reference": "on_the_fly"},
                        training={"max_steps": 12, "learning_rate": 5e-3, "micro_batch_size": 8})
    workspace = new_workspace(tmp_path / "ws", recipe)
    hook = RayJobHook(address=ray_cluster["dashboard_url"], token_file=ray_cluster["token_file"])
    status, logs = wait(hook, submit(hook, ray_cluster, workspace, "dpo-lora"))
    assert status == "SUCCEEDED", logs[-3000:]
    rows = records(workspace)
    assert not (workspace / "train" / "reference_logps.pt").exists()
    assert rows[0]["rewards/chosen"] == 0.0 and rows[0]["rewards/rejected"] == 0.0  # B = 0: adapters change nothing
    assert mean(rows[-3:], "rewards/margin") > mean(rows[:3], "rewards/margin")
    assert (workspace / "adapter").exists()
