"""Supervised fine-tuning: Ray Train's TorchTrainer runs `train_loop` on every worker.

The loop, top to bottom: set LR → micro-steps (loss over assistant tokens, normalised by the
step's global target-token count) → clip → step → zero_grad → log → maybe checkpoint. It resumes
from the newest complete checkpoint in the workspace, so a retried Airflow task or a restarted
Ray worker continues where training stopped instead of starting over.
"""

from __future__ import annotations

from pathlib import Path

from posttrain.recipe import Recipe


def train_loop(config: dict) -> None:
    import torch
    import torch.distributed as dist

    from posttrain.training_lib.grad_clip import clip_grad_norm
    from posttrain.training_lib.trainers import common

    w = common.start_worker(config)
    t, device = w.t, w.device
    # Ranks of one tensor-parallel group see the same data; the data-parallel ranks split it.
    loader, blocks_per_epoch = make_loader(w.recipe, w.workspace, w.dp_rank, w.dp_size)
    max_steps = t.max_steps or t.epochs * max(1, blocks_per_epoch // (t.micro_batch_size * t.grad_accum))
    model, trainable, optimizer, report = common.build_model(w)
    step = common.resume(w, model, optimizer, loader)
    common.announce(w, trainable, report, f"~{blocks_per_epoch} blocks of {w.recipe.data.max_seq_len} tokens per "
                                          f"epoch ({w.recipe.data.packing.mode} packing)")
    logger = common.step_logger(w, max_steps, step)

    model.train()
    while step < max_steps:
        step += 1
        lr = common.set_learning_rate(w, optimizer, step, max_steps)
        micro, targets = common.packed_micro_batches(w, loader)  # targets: the step's global token count
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
        common.maybe_checkpoint(w, step, max_steps, model, optimizer, loader)

    common.finish(w, model, logger, max_steps)


def make_loader(recipe: Recipe, workspace: Path, rank: int, world: int) -> tuple:
    """This rank's micro-batches: offline-packed blocks, or blocks packed on the fly from the
    document stream. Returns (loader, blocks per epoch over all ranks)."""
    from posttrain.training_lib.data.loader import PackedLoader, read_blocks, read_documents, read_manifest
    from posttrain.training_lib.data.streaming import StreamingLoader, StreamingPacker

    t, packing = recipe.training, recipe.data.packing
    manifest = read_manifest(workspace)
    if packing.mode == "streaming":
        ids, trains = read_documents(workspace, "train")
        packer = StreamingPacker(ids, trains, recipe.data.max_seq_len, manifest["tokenizer"]["block_pad_id"],
                                 t.seed, rank, world, packing.buffer_docs)
        return StreamingLoader(packer, t.micro_batch_size), manifest["splits"]["train"]["blocks"]
    loader = PackedLoader(read_blocks(workspace, "train"), rank, world, t.micro_batch_size, t.seed)
    return loader, loader.num_blocks


def run(recipe: Recipe, workspace: Path) -> dict:
    """The Ray job driver: fit on the cluster this job runs in."""
    from posttrain.training_lib.trainers.common import fit

    return fit(recipe, workspace, train_loop)
