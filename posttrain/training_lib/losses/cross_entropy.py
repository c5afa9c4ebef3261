"""Token-level cross-entropy over the positions that train (labels != -100)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posttrain.training_lib.data.packing import IGNORE
from posttrain.training_lib.models.attention import check_isolates_documents


def summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of the per-token losses, so that the caller can normalise by the number of
    target tokens across micro-batches and ranks: every assistant token weighs the same."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1),
                           ignore_index=IGNORE, reduction="sum")


def packed_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of packed blocks. No attention_mask on purpose: the documents are found from the
    restarting position_ids (per-document attention, or the block-diagonal mask transformers builds),
    so they never see each other; a backend that can't do that is refused."""
    check_isolates_documents(model)
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
