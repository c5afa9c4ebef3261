"""Supervised fine-tuning: Ray Train's TorchTrainer runs `train_loop` on every worker.

The loop, top to bottom: set LR → micro-steps (loss over assistant tokens, normalised by the
step's global target-token count) → clip → step → zero_grad → log → maybe checkpoint. It resumes
from the newest complete checkpoint in the workspace, so a retried Airflow task or a restarted
Ray worker continues where training stopped instead of starting over.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from posttrain.recipe import Recipe
from posttrain.storage_fs import Store
from posttrain.training_lib import runtime
from posttrain.training_lib.data.loader import make_loader, steps_for
from posttrain.training_lib.grad_clip import clip_grad_norm
from posttrain.training_lib.trainers.common import fit


def train_loop(config: dict) -> None:
    w = runtime.start_worker(config)
    t, device = w.t, w.device
    # Ranks of one tensor-parallel group see the same data; the data-parallel ranks split it.
    loader, blocks_per_epoch = make_loader(w.recipe, w.workspace, w.dp_rank, w.dp_size)
    max_steps = steps_for(w.recipe, blocks_per_epoch, w.dp_size)
    model, trainable, optimizer, report = runtime.build_model(w)
    step, _ = runtime.resume(w, model, optimizer, loader)
    runtime.announce(w, trainable, report, f"~{blocks_per_epoch} blocks of {w.recipe.data.max_seq_len} tokens per "
                                           f"epoch ({w.recipe.data.packing.mode} packing)")
    logger = runtime.step_logger(w, max_steps, step)

    model.train()
    while step < max_steps:
        step += 1
        lr = runtime.set_learning_rate(w, optimizer, step, max_steps)
        micro, targets = runtime.packed_micro_batches(w, loader)  # targets: the step's global token count
        loss_sum = torch.zeros((), device=device)
        for batch in micro:
            loss = model(**batch)  # summed loss over the assistant tokens of the micro-batch
            # Gradients are averaged over the data-parallel ranks by FSDP's reduction, hence × dp_size.
            (loss * w.dp_size / targets.clamp(min=1)).backward()
            loss_sum += loss.detach()
        grad_norm = clip_grad_norm(trainable, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(loss_sum, group=w.dp_group)
        tokens = int(sum(b["input_ids"].numel() for b in micro)) * w.dp_size
        if step % t.log_every == 0 or step == max_steps:
            logger.log(step, float(loss_sum / targets.clamp(min=1)), lr, grad_norm, tokens)
        runtime.maybe_checkpoint(w, step, max_steps, model, optimizer, loader)

    runtime.finish(w, model, logger, max_steps)


def run(recipe: Recipe, workspace: Store) -> dict:
    """The Ray job driver: fit on the cluster this job runs in."""
    return fit(recipe, workspace, train_loop)
