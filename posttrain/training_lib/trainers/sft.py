"""Supervised fine-tuning: Ray Train's TorchTrainer runs `train_loop` on every worker.

The loop, top to bottom: set LR → micro-steps (loss over assistant tokens, normalised by the
step's global target-token count) → clip → step → zero_grad → log → maybe checkpoint. It resumes
from the newest complete checkpoint in the workspace, so a retried Airflow task or a restarted
Ray worker continues where training stopped instead of starting over.
"""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.recipe import Recipe


def train_loop(config: dict) -> None:
    import ray.train
    import torch
    import torch.distributed as dist

    from posttrain.training_lib import checkpoint
    from posttrain.training_lib.export import export
    from posttrain.training_lib.grad_clip import clip_grad_norm
    from posttrain.training_lib.metrics import make_step_logger
    from posttrain.training_lib.parallel.parallelize import build_parallel_model, make_mesh
    from posttrain.training_lib.parallel.plan import make_plan
    from posttrain.training_lib.schedule import learning_rate

    recipe = Recipe.model_validate(config["recipe"])
    workspace = Path(config["workspace"])
    t = recipe.training
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = "cuda" if torch.cuda.is_available() and recipe.compute.gpus_per_worker > 0 else "cpu"
    plan = make_plan(recipe, world, device)
    torch.manual_seed(t.seed)
    mesh = make_mesh(plan, device)
    # Ranks of one tensor-parallel group see the same data; the data-parallel ranks split it.
    dp_rank, dp_size, dp_group = mesh["dp"].get_local_rank(), plan.data_parallel, mesh["dp"].get_group()

    loader, blocks_per_epoch = make_loader(recipe, workspace, dp_rank, dp_size)
    max_steps = t.max_steps or t.epochs * max(1, blocks_per_epoch // (t.micro_batch_size * t.grad_accum))

    model, load_report = build_parallel_model(recipe, plan, mesh)  # each rank reads only its shards
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay)

    ckpt_root = workspace / "checkpoints"
    step = 0
    if (latest := checkpoint.latest_checkpoint(ckpt_root)) is not None:
        step, loader_state = checkpoint.load(latest, model, optimizer, rank)
        loader.load_state_dict(loader_state)
        if rank == 0:
            print(f"resumed from {latest} at step {step}", flush=True)
    if rank == 0:
        print(f"plan: {json.dumps(plan.as_dict())}; {sum(p.numel() for p in trainable)} trainable parameters "
              f"on {world} workers; ~{blocks_per_epoch} blocks of {recipe.data.max_seq_len} tokens per epoch "
              f"({recipe.data.packing.mode} packing); rank 0 read {load_report.bytes_read / 2**20:.1f} MiB of the "
              f"{load_report.full_bytes / 2**20:.1f} MiB model", flush=True)
    logger = make_step_logger(recipe, workspace, rank, world, device, max_steps, plan.as_dict(), start_step=step)

    model.train()
    while step < max_steps:
        step += 1
        lr = learning_rate(step, t.learning_rate, max_steps, t.warmup_steps, t.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [{k: v.to(device) for k, v in loader.next_batch().items()} for _ in range(t.grad_accum)]
        targets = torch.tensor(float(sum(int((b["labels"] != -100).sum()) for b in micro)), device=device)
        dist.all_reduce(targets, group=dp_group)  # global number of target tokens in this step
        loss_sum = torch.zeros((), device=device)
        for batch in micro:
            loss = model(**batch)  # summed loss over the assistant tokens of the micro-batch
            # Gradients are averaged over the data-parallel ranks by FSDP's reduction, hence × dp_size.
            (loss * dp_size / targets.clamp(min=1)).backward()
            loss_sum += loss.detach()
        grad_norm = clip_grad_norm(trainable, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(loss_sum, group=dp_group)
        tokens = int(sum(b["input_ids"].numel() for b in micro)) * dp_size
        if step % t.log_every == 0 or step == max_steps:
            logger.log(step, float(loss_sum / targets.clamp(min=1)), lr, grad_norm, tokens)
        if step % plan.checkpoint_every == 0 or step == max_steps:
            checkpoint.save(ckpt_root, step, model, optimizer, loader.state_dict(), rank, plan.keep_checkpoints)

    logger.close()  # ends the MLflow run (rank 0) with the summary of the metrics
    model_dir = export(model, recipe, workspace, rank)
    if rank == 0:
        (workspace / "train" / "summary.json").write_text(json.dumps(
            summarize(workspace, model_dir, plan.as_dict(), max_steps), indent=2))
    dist.barrier()


def make_loader(recipe: Recipe, workspace: Path, rank: int, world: int) -> tuple:
    """This rank's micro-batches: offline-packed blocks, or blocks packed on the fly from the
    document stream. Returns (loader, blocks per epoch over all ranks)."""
    from posttrain.training_lib.data.loader import PackedLoader, read_blocks, read_documents
    from posttrain.training_lib.data.streaming import StreamingLoader, StreamingPacker

    t, packing = recipe.training, recipe.data.packing
    manifest = json.loads((workspace / "data" / "manifest.json").read_text())
    if packing.mode == "streaming":
        ids, trains = read_documents(workspace, "train")
        packer = StreamingPacker(ids, trains, recipe.data.max_seq_len, manifest["tokenizer"]["block_pad_id"],
                                 t.seed, rank, world, packing.buffer_docs)
        return StreamingLoader(packer, t.micro_batch_size), manifest["splits"]["train"]["blocks"]
    loader = PackedLoader(read_blocks(workspace, "train"), rank, world, t.micro_batch_size, t.seed)
    return loader, loader.num_blocks


def summarize(workspace: Path, model_dir: Path | None, plan: dict, max_steps: int) -> dict:
    from posttrain.training_lib.metrics import read_metrics, summarize_rows

    return {
        "steps": max_steps,
        **summarize_rows(read_metrics(workspace / "train" / "metrics.jsonl")),
        "model_dir": str(model_dir) if model_dir else None,
        "plan": plan,
    }


def run(recipe: Recipe, workspace: Path) -> dict:
    """The Ray job driver: fit on the cluster this job runs in."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from posttrain.training_lib.data.tokenizer import require_same_tokenizer

    # Refuse before any worker starts: ids prepared by another tokenizer would train silently wrong.
    require_same_tokenizer(recipe.tokenizer_uri, workspace)
    c = recipe.compute
    use_gpu = c.gpus_per_worker > 0
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"recipe": recipe.model_dump(mode="json"), "workspace": str(workspace)},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=c.workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if use_gpu else {})}),
        run_config=RunConfig(name="train", storage_path=str(workspace / "ray_train"),
                             failure_config=FailureConfig(max_failures=2)),
    )
    trainer.fit()
    return json.loads((workspace / "train" / "summary.json").read_text())
