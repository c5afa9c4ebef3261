"""DPO's evaluation on the prepared eval pairs: how often the trained model's implicit reward
prefers the chosen reply, by what margin, and the DPO loss, against the reference the training
used (the base model, vocabulary padded the same way; with LoRA, the adapters at their zero
start change nothing)."""

from __future__ import annotations

from pathlib import Path

import torch

from posttrain.recipe import Recipe
from posttrain.storage_fs import Store
from posttrain.training_lib.data.loader import read_manifest
from posttrain.training_lib.data.pairs import collate_pairs, read_pairs
from posttrain.training_lib.losses.logprobs import pair_logprobs
from posttrain.training_lib.losses.preference import preference_loss
from posttrain.training_lib.models.loading import load_for_eval, load_for_training
from posttrain.training_lib.models.with_loss import CausalLMWithLoss


@torch.no_grad()
def preference_metrics(recipe: Recipe, model_dir: Path, workspace: Store, pairs_per_batch: int = 8
                       ) -> tuple[dict, list[dict]]:
    """(metrics, per pair in prepared order: its accuracy (0/1), reward margin and DPO loss)."""
    dpo = recipe.dpo
    policy = CausalLMWithLoss(load_for_eval(model_dir)).eval()
    reference = CausalLMWithLoss(load_for_training(recipe.model_copy(update={"model": recipe.model.model_copy(
        update={"lora": None})}))).eval()
    pairs = read_pairs(workspace, "eval")
    pad_id = read_manifest(workspace)["tokenizer"]["block_pad_id"]
    normalize = dpo.loss == "ipo"
    scored = {"policy": [], "reference": []}
    for start in range(0, len(pairs), pairs_per_batch):
        chunk = pairs[start:start + pairs_per_batch]
        batch = collate_pairs(chunk, pad_id)
        n = int(batch.pop("num_sequences"))
        for name, model in (("policy", policy), ("reference", reference)):
            scored[name].append(pair_logprobs(model, batch, n, len(chunk), normalize=normalize))
    pol, ref = torch.cat(scored["policy"]), torch.cat(scored["reference"])
    out = preference_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], dpo.beta, dpo.loss)
    margin = out.rewards_chosen - out.rewards_rejected
    # Each pair's own loss: the aggregate is their mean, so the per-pair values average to it.
    losses = [float(preference_loss(pol[i:i + 1, 0], pol[i:i + 1, 1], ref[i:i + 1, 0], ref[i:i + 1, 1], dpo.beta,
                                    dpo.loss).loss) for i in range(len(pairs))]
    per_pair = [{"preference_accuracy": float(m > 0), "reward_margin": float(m), "dpo_loss": loss}
                for m, loss in zip(margin.tolist(), losses, strict=True)]
    return ({"preference_accuracy": float((margin > 0).float().mean()), "reward_margin": float(margin.mean()),
             "dpo_loss": float(out.loss), "eval_pairs": len(pairs)}, per_pair)
