"""Teacher-forced loss on the prepared eval blocks: the same masking and packing as training."""

from __future__ import annotations

from pathlib import Path

import torch

from posttrain.prep.packing import IGNORE
from posttrain.training_lib.data.loader import read_blocks
from posttrain.training_lib.models.loading import load_for_eval
from posttrain.training_lib.models.with_loss import CausalLMWithLoss


@torch.no_grad()
def eval_loss(model_dir: Path, workspace: Path, batch_size: int = 4) -> dict:
    model = CausalLMWithLoss(load_for_eval(model_dir)).eval()
    blocks = read_blocks(workspace, "eval")
    total, count = 0.0, 0
    for start in range(0, blocks["input_ids"].shape[0], batch_size):
        batch = {k: v[start:start + batch_size] for k, v in blocks.items()}
        total += float(model(**batch))
        count += int((batch["labels"] != IGNORE).sum())
    return {"eval_loss": total / max(count, 1), "eval_tokens": count}
