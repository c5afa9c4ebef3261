"""Teacher-forced loss on the prepared eval blocks: the same masking and packing as training.

A custom head the export carries (model/components/) is applied as in training.
Besides the aggregate (summed loss over every labelled token / their count, as training reports
it), each eval example's summed loss and labelled-token count, keyed by its line in the eval file:
what a paired comparison of this token-weighted mean needs (see posttrain/promotion_stats.py)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from posttrain.prep.packing import IGNORE
from posttrain.storage_fs import Store
from posttrain.training_lib.data.loader import read_blocks, split_tables
from posttrain.training_lib.losses.chunked import chunked_cross_entropy
from posttrain.training_lib.losses.logprobs import token_logprobs
from posttrain.training_lib.models.components import load_components
from posttrain.training_lib.models.loading import load_for_eval
from posttrain.training_lib.models.with_loss import CausalLMWithLoss, base_model, output_weight


def block_documents(workspace: Store, split: str = "eval") -> tuple[list[list[int]], list[list[int]]] | None:
    """Per block: its documents' lengths and source lines; None for data prepared before prepare
    recorded the lines (those runs get no per-example loss)."""
    tables = split_tables(workspace, split)
    if not tables or any("doc_rows" not in t.column_names for t in tables):
        return None
    return ([r for t in tables for r in t.column("doc_lens").to_pylist()],
            [r for t in tables for r in t.column("doc_rows").to_pylist()])


@torch.no_grad()
def eval_loss(model_dir: Path, workspace: Store, batch_size: int = 4) -> tuple[dict, dict[int, dict]]:
    """({eval_loss, eval_tokens}, {line: {eval_loss__sum, eval_loss__tokens}})."""
    lm = load_for_eval(model_dir)
    # The export's custom head (model/components/), as training applied it; none for a plain export.
    model = CausalLMWithLoss(lm, head=load_components(model_dir, lm.config).get("head")).eval()
    weight = output_weight(base_model(model.lm))
    blocks = read_blocks(workspace, "eval")
    documents = block_documents(workspace)
    total, count = 0.0, 0
    per_line: dict[int, list[float]] = defaultdict(lambda: [0.0, 0])
    for start in range(0, blocks["input_ids"].shape[0], batch_size):
        batch = {k: v[start:start + batch_size] for k, v in blocks.items()}
        # One forward; the aggregate is the very sum training's loss computes.
        hidden = model(batch["input_ids"], batch["position_ids"], output="hidden")
        total += float(chunked_cross_entropy(hidden, weight, batch["labels"], model.chunk_tokens))
        count += int((batch["labels"] != IGNORE).sum())
        if documents is None:
            continue
        losses = (-token_logprobs(hidden, weight, batch["labels"], model.chunk_tokens)).double()
        labelled = batch["labels"] != IGNORE
        for b in range(losses.shape[0]):
            offset = 0
            for length, line in zip(documents[0][start + b], documents[1][start + b], strict=True):
                if line >= 0:  # labels never point across documents (prep/packing.shifted_labels)
                    per_line[line][0] += float(losses[b, offset:offset + length].sum())
                    per_line[line][1] += int(labelled[b, offset:offset + length].sum())
                offset += length
    rows = {line: {"eval_loss__sum": s, "eval_loss__tokens": t} for line, (s, t) in per_line.items() if t}
    return {"eval_loss": total / max(count, 1), "eval_tokens": count}, rows
