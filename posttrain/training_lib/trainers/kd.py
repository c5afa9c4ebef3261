"""Knowledge distillation: Ray Train's TorchTrainer runs `train_loop` on every worker.

The loop, top to bottom: set LR → micro-steps (the frozen teacher's hidden states, then the
student's divergence to it and its cross-entropy on the data, both over assistant tokens and in
chunks of positions, mixed by kd.weight and normalised by the step's global target-token count)
→ clip → step → log → maybe checkpoint. The data, resume and export are SFT's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from posttrain.prep.tokenizer import require_same_tokenizer
from posttrain.recipe import Recipe
from posttrain.storage_fs import Store
from posttrain.training_lib import runtime
from posttrain.training_lib.data.loader import make_loader, steps_for
from posttrain.training_lib.grad_clip import clip_grad_norm
from posttrain.training_lib.models.with_loss import base_model
from posttrain.training_lib.parallel.parallelize import build_frozen_model
from posttrain.training_lib.trainers.common import fit


def train_loop(config: dict) -> None:
    w = runtime.start_worker(config)
    t, device, kd = w.t, w.device, w.recipe.kd
    loader, blocks_per_epoch = make_loader(w.recipe, w.workspace, w.dp_rank, w.dp_size)
    max_steps = steps_for(w.recipe, blocks_per_epoch, w.dp_size)
    model, trainable, optimizer, report = runtime.build_model(w)
    teacher, teacher_report = build_frozen_model(w.recipe, w.plan, w.mesh, kd.teacher)
    teacher_weight = base_model(teacher.lm).lm_head.weight  # replicated: readable outside the teacher's forward
    step, _ = runtime.resume(w, model, optimizer, loader)
    runtime.announce(w, trainable, report, f"teacher {kd.teacher} ({teacher_report.local_bytes / 2**20:.1f} MiB "
                                           f"on rank 0), {kd.divergence} at temperature {kd.temperature}, "
                                           f"weight {kd.weight}")
    logger = runtime.step_logger(w, max_steps, step)

    model.train()
    while step < max_steps:
        step += 1
        lr = runtime.set_learning_rate(w, optimizer, step, max_steps)
        micro, targets = runtime.packed_micro_batches(w, loader)  # targets: the step's global token count
        parts = torch.zeros(2, device=device)  # divergence, cross-entropy (sums)
        for batch in micro:
            with torch.no_grad():
                teacher_hidden = teacher(**batch, output="hidden")
            pair = model(**batch, output="distill", teacher=(teacher_hidden, teacher_weight),
                         divergence=kd.divergence, temperature=kd.temperature)
            loss = kd.weight * pair[0] + (1 - kd.weight) * pair[1]
            # Gradients are averaged over the data-parallel ranks by FSDP's reduction, hence × dp_size.
            (loss * w.dp_size / targets.clamp(min=1)).backward()
            parts += pair.detach()
        grad_norm = clip_grad_norm(trainable, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(parts, group=w.dp_group)
        divergence, ce = (float(v) for v in parts / targets.clamp(min=1))
        tokens = int(sum(b["input_ids"].numel() for b in micro)) * w.dp_size
        if step % t.log_every == 0 or step == max_steps:
            logger.log(step, kd.weight * divergence + (1 - kd.weight) * ce, lr, grad_norm, tokens,
                       extra={f"kd/{kd.divergence}": divergence, "kd/cross_entropy": ce})
        runtime.maybe_checkpoint(w, step, max_steps, model, optimizer, loader)

    runtime.finish(w, model, logger, max_steps)


def run(recipe: Recipe, workspace: Store) -> dict:
    """The Ray job driver: refuse a teacher of another tokenizer, then fit."""
    require_same_tokenizer(recipe.kd.teacher, workspace)
    return fit(recipe, workspace, train_loop)
