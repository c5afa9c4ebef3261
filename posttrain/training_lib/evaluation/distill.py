"""KD's own evaluation: how far the distilled student still is from its teacher on the eval blocks
(the recipe's divergence and temperature, per assistant token), chunked like training."""

from __future__ import annotations

from pathlib import Path

import torch

from posttrain.prep.packing import IGNORE
from posttrain.recipe import Recipe
from posttrain.training_lib.data.loader import read_blocks
from posttrain.training_lib.losses.distill import distill_loss
from posttrain.training_lib.models.loading import load_for_eval
from posttrain.uris import model_location


@torch.no_grad()
def divergence_to_teacher(recipe: Recipe, model_dir: Path, workspace: Path, batch_size: int = 4) -> dict:
    kd = recipe.kd
    student, teacher = load_for_eval(model_dir), load_for_eval(model_location(kd.teacher))
    blocks = read_blocks(workspace, "eval")
    total, count = 0.0, 0
    for start in range(0, blocks["input_ids"].shape[0], batch_size):
        batch = {k: v[start:start + batch_size] for k, v in blocks.items()}
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        hs = student.model(**inputs).last_hidden_state
        ht = teacher.model(**inputs).last_hidden_state
        total += float(distill_loss(hs, student.lm_head.weight, ht, teacher.lm_head.weight, batch["labels"],
                                    kd.divergence, kd.temperature))
        count += int((batch["labels"] != IGNORE).sum())
    return {"kl_to_teacher": total / max(count, 1)}
