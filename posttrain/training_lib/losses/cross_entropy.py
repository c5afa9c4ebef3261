"""Token-level cross-entropy over the positions that train (labels != IGNORE)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.prep.packing import IGNORE


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of the per-token losses, so that the caller can normalise by the number of
    target tokens across micro-batches and ranks: every assistant token weighs the same."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1),
                           ignore_index=IGNORE, reduction="sum")
