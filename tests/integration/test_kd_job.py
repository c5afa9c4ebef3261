"""Knowledge distillation on the tiny model as the operators run it (a Ray job on a local head, 2
FSDP2 workers): the student's KL to a briefly fine-tuned teacher falls, and a teacher of another
tokenizer is refused, with both fingerprints, before anything is trained."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from posttrain.hooks.ray import RayJobHook
from posttrain.prep.prepare import prepare
from posttrain.prep.tokenizer import TokenizerMismatch
from posttrain.recipe import load_recipe
from tests.conftest import write_recipe
from tests.integration.test_training_job import new_workspace, submit, wait


def kd_recipe(folder: Path, teacher: Path, **kd):  # noqa: ANN003, ANN201
    return load_recipe(write_recipe(folder, name="kd", paradigm="kd",
                                    kd={"teacher": str(teacher), "weight": 1.0, **kd},
                                    training={"max_steps": 16, "learning_rate": 3e-3, "micro_batch_size": 2,
                                              "checkpoint_every": 8}))


@pytest.mark.slow
def test_student_kl_to_the_teacher_falls(tmp_path: Path, tiny_model: Path, tiny_teacher: Path,
                                         ray_cluster: dict) -> None:
    workspace = new_workspace(tmp_path / "ws", kd_recipe(tmp_path, tiny_teacher))
    hook = RayJobHook(address=ray_cluster["dashboard_url"], token_file=ray_cluster["token_file"])
    status, logs = wait(hook, submit(hook, ray_cluster, workspace, "kd"))
    assert status == "SUCCEEDED", logs[-3000:]
    rows = [json.loads(x) for x in (workspace / "train" / "metrics.jsonl").read_text().splitlines()]
    kl = [r["kd/forward_kl"] for r in rows]
    print("KL to the teacher per step:", [round(v, 4) for v in kl])
    assert sum(kl[-3:]) / 3 < 0.7 * sum(kl[:3]) / 3, kl
    assert (workspace / "model" / "model.safetensors").exists()


def test_teacher_with_another_tokenizer_is_refused(tmp_path: Path, tiny_model: Path, tiny_teacher: Path) -> None:
    other = tmp_path / "other-teacher"
    shutil.copytree(tiny_teacher, other)
    template = other / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    recipe = kd_recipe(tmp_path, other)
    with pytest.raises(TokenizerMismatch) as err:
        prepare(recipe, tmp_path / "ws")
    message = str(err.value)
    assert message.startswith(f"kd.teacher file://{other}") and message.count("fingerprint") == 1
    assert "has" in message and "distillation needs the same tokenizer" in message
    assert not (tmp_path / "ws" / "data" / "manifest.json").exists()
