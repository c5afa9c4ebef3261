"""Direct preference optimization: Ray Train's TorchTrainer runs `train_loop` on every worker.

The loop, top to bottom: reference log-probs (precomputed once, or per batch with the LoRA adapters
off) → per step: set LR → micro-batches of pairs packed into one row → sequence log-probs of the
chosen and rejected sides → DPO/IPO loss against the reference → clip → step → log rewards and
accuracy → maybe checkpoint. Resume works as for SFT; the precomputed reference is read back from
the workspace instead of being computed again.
"""

from __future__ import annotations

import io

import torch
import torch.distributed as dist

from posttrain.prep.packing import IGNORE
from posttrain.recipe import Recipe
from posttrain.storage_fs import Store
from posttrain.training_lib import runtime
from posttrain.training_lib.data.loader import read_manifest
from posttrain.training_lib.data.pairs import Pair, PairLoader, collate_pairs, read_pairs
from posttrain.training_lib.grad_clip import clip_grad_norm
from posttrain.training_lib.losses.logprobs import pair_logprobs, sequence_logprobs
from posttrain.training_lib.losses.preference import preference_loss
from posttrain.training_lib.trainers.common import fit

REFERENCE_FILE = "reference_logps.pt"


def train_loop(config: dict) -> None:
    w = runtime.start_worker(config)
    t, device, dpo = w.t, w.device, w.recipe.dpo
    pairs = read_pairs(w.workspace, "train")
    pad_id = read_manifest(w.workspace)["tokenizer"]["block_pad_id"]
    loader = PairLoader(pairs, w.dp_rank, w.dp_size, t.micro_batch_size, t.seed, pad_id, grad_accum=t.grad_accum)
    max_steps = t.max_steps or t.epochs * (loader.batches_per_epoch // t.grad_accum)  # whole steps per epoch
    model, trainable, optimizer, report = runtime.build_model(w)
    reference = precomputed_reference(w, model, pairs, pad_id) if dpo.reference == "precomputed" else None
    step, _ = runtime.resume(w, model, optimizer, loader)
    runtime.announce(w, trainable, report, f"{len(pairs)} preference pairs, {t.micro_batch_size} per micro-batch; "
                                           f"{dpo.loss} loss, beta {dpo.beta}, {dpo.reference} reference")
    logger = runtime.step_logger(w, max_steps, step)

    model.train()
    while step < max_steps:
        step += 1
        lr = runtime.set_learning_rate(w, optimizer, step, max_steps)
        sums = torch.zeros(5, device=device)  # loss, rewards/chosen, rewards/rejected, correct, pairs
        tokens = 0
        for _ in range(t.grad_accum):
            batch = loader.next_batch()
            index, n = batch.pop("index"), int(batch.pop("num_sequences"))
            batch = {k: v.to(device) for k, v in batch.items()}
            policy = pair_logprobs(model, batch, n, len(index), normalize=dpo.loss == "ipo")
            if reference is not None:
                ref = reference[index]
                ref = (ref[..., 0] / ref[..., 1].clamp(min=1) if dpo.loss == "ipo" else ref[..., 0]).to(policy)
            else:
                with model.lm.disable_adapter(), torch.no_grad():  # the base model is the reference
                    ref = pair_logprobs(model, batch, n, len(index), normalize=dpo.loss == "ipo")
            out = preference_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], dpo.beta, dpo.loss)
            # The mean over the step's pairs: every rank holds as many, and FSDP averages over dp ranks.
            (out.loss / t.grad_accum).backward()
            sums += torch.tensor([float(out.loss) * len(index), float(out.rewards_chosen.sum()),
                                  float(out.rewards_rejected.sum()),
                                  float((out.rewards_chosen > out.rewards_rejected).sum()), len(index)], device=device)
            tokens += batch["input_ids"].numel()
        grad_norm = clip_grad_norm(trainable, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(sums, group=w.dp_group)
        loss, chosen, rejected, correct = (float(v) for v in sums[:4] / sums[4])
        if step % t.log_every == 0 or step == max_steps:
            logger.log(step, loss, lr, grad_norm, tokens * w.dp_size, extra={
                "rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/margin": chosen - rejected,
                "rewards/accuracy": correct})
        runtime.maybe_checkpoint(w, step, max_steps, model, optimizer, loader)

    runtime.finish(w, model, logger, max_steps)


def precomputed_reference(w: runtime.Worker, model: torch.nn.Module, pairs: list[Pair], pad_id: int) -> torch.Tensor:
    """[pairs, 2, 2]: (summed log-prob, token count) of each pair's chosen and rejected completion
    under the model before its first update, i.e. the reference. Computed once by the data-parallel
    ranks together (each scores a share; every rank runs the same number of forwards, which FSDP's
    collectives need) and kept in train/reference_logps.pt, so a resumed job reads it back."""
    saved_at = w.workspace / "train" / REFERENCE_FILE
    if saved_at.exists():
        saved = torch.load(io.BytesIO(saved_at.read_bytes()))
        if saved["pairs"] == len(pairs):
            return saved["logps"]
    per_rank = -(-len(pairs) // w.dp_size)
    mine = list(range(w.dp_rank * per_rank, min(len(pairs), (w.dp_rank + 1) * per_rank)))
    out = torch.zeros(len(pairs), 2, 2, dtype=torch.float64, device=w.device)
    mbs = w.t.micro_batch_size
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, per_rank, mbs):
            chunk = mine[start:start + mbs]
            real = len(chunk)
            chunk = chunk or [0]  # a rank with nothing left still joins the collectives
            batch = {k: v.to(w.device) for k, v in collate_pairs([pairs[i] for i in chunk], pad_id).items()}
            n = int(batch.pop("num_sequences"))
            token_logps = model(**batch, output="token_logprobs")
            sums = sequence_logprobs(token_logps, batch["position_ids"], n)[: 2 * len(chunk)].view(-1, 2)
            counts = sequence_logprobs((batch["labels"] != IGNORE).to(sums.dtype), batch["position_ids"], n)
            if real:
                out[chunk, :, 0] = sums.to(out)
                out[chunk, :, 1] = counts[: 2 * len(chunk)].view(-1, 2).to(out)
    model.train(was_training)
    dist.all_reduce(out, group=w.dp_group)  # each pair was scored by exactly one dp rank
    out = out.cpu()
    if w.rank == 0:
        buffer = io.BytesIO()
        torch.save({"pairs": len(pairs), "logps": out}, buffer)
        saved_at.write_bytes(buffer.getvalue())  # whole: a reader sees the old one or the new one
    return out


def run(recipe: Recipe, workspace: Store) -> dict:
    """The Ray job driver: fit on the cluster this job runs in."""
    return fit(recipe, workspace, train_loop)
