"""KD's own evaluation: how far the distilled student still is from its teacher on the eval blocks
(the recipe's divergence and temperature, per assistant token), chunked like training; and each
eval example's summed divergence and labelled tokens, for promotion's paired comparison."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from posttrain.prep.packing import IGNORE
from posttrain.recipe import Recipe
from posttrain.storage_fs import Store
from posttrain.training_lib.data.loader import read_blocks
from posttrain.training_lib.evaluation.loss import block_documents
from posttrain.training_lib.losses.distill import distill_loss
from posttrain.training_lib.models.loading import load_for_eval
from posttrain.uris import model_location


@torch.no_grad()
def divergence_to_teacher(recipe: Recipe, model_dir: Path, workspace: Store, batch_size: int = 4
                          ) -> tuple[dict, dict[int, dict]]:
    kd = recipe.kd
    student, teacher = load_for_eval(model_dir), load_for_eval(model_location(kd.teacher))
    blocks = read_blocks(workspace, "eval")
    documents = block_documents(workspace)
    total, count = 0.0, 0
    per_line: dict[int, list[float]] = defaultdict(lambda: [0.0, 0])
    for start in range(0, blocks["input_ids"].shape[0], batch_size):
        batch = {k: v[start:start + batch_size] for k, v in blocks.items()}
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        hs = student.model(**inputs).last_hidden_state
        ht = teacher.model(**inputs).last_hidden_state
        labels = batch["labels"]
        total += float(distill_loss(hs, student.lm_head.weight, ht, teacher.lm_head.weight, labels,
                                    kd.divergence, kd.temperature))
        count += int((labels != IGNORE).sum())
        if documents is None:
            continue
        for b in range(labels.shape[0]):
            offset = 0
            for length, line in zip(documents[0][start + b], documents[1][start + b], strict=True):
                # The divergence is a sum over labelled positions: one document's labels alone give its part.
                doc = torch.full_like(labels[b:b + 1], IGNORE)
                doc[0, offset:offset + length] = labels[b, offset:offset + length]
                tokens = int((doc != IGNORE).sum())
                if line >= 0 and tokens:
                    per_line[line][0] += float(distill_loss(hs[b:b + 1], student.lm_head.weight, ht[b:b + 1],
                                                            teacher.lm_head.weight, doc, kd.divergence, kd.temperature))
                    per_line[line][1] += tokens
                offset += length
    rows = {line: {"kl_to_teacher__sum": s, "kl_to_teacher__tokens": t} for line, (s, t) in per_line.items()}
    return {"kl_to_teacher": total / max(count, 1)}, rows
