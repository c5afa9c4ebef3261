"""What every paradigm's training loop shares: the worker's place in the job (ranks, plan, mesh),
the parallel model and its optimizer, resume, the LR schedule, the export at the end, and the
Ray Train driver. Each trainer module keeps only its own loop.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.recipe import Recipe, TrainingConfig


@dataclass
class Worker:
    """This Ray Train worker's place in the job."""

    recipe: Recipe
    workspace: Path
    rank: int
    world: int
    device: str
    plan: Any  # parallel.plan.Plan
    mesh: Any  # DeviceMesh ("dp", "tp")

    @property
    def t(self) -> TrainingConfig:
        return self.recipe.training

    @property
    def dp_rank(self) -> int:
        return self.mesh["dp"].get_local_rank()

    @property
    def dp_size(self) -> int:
        return self.plan.data_parallel

    @property
    def dp_group(self) -> Any:
        return self.mesh["dp"].get_group()

    @property
    def checkpoints(self) -> Path:
        return self.workspace / "checkpoints"


def start_worker(config: dict) -> Worker:
    import ray.train
    import torch

    from posttrain.training_lib.parallel.parallelize import make_mesh
    from posttrain.training_lib.parallel.plan import make_plan

    recipe = Recipe.model_validate(config["recipe"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = "cuda" if torch.cuda.is_available() and recipe.compute.gpus_per_worker > 0 else "cpu"
    plan = make_plan(recipe, world, device)
    torch.manual_seed(recipe.training.seed)
    return Worker(recipe, Path(config["workspace"]), rank, world, device, plan, make_mesh(plan, device))


def build_model(worker: Worker) -> tuple[Any, list, Any, Any]:
    """(model, trainable parameters, AdamW over them, LoadReport): each rank reads only its shards."""
    import torch

    from posttrain.training_lib.parallel.parallelize import build_parallel_model

    model, report = build_parallel_model(worker.recipe, worker.plan, worker.mesh)
    trainable = [p for p in model.parameters() if p.requires_grad]
    t = worker.t
    # Fused on GPUs: one kernel for the whole update (it takes FSDP2's DTensors; benchmarks/train_step.py).
    optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay,
                                  fused=worker.device == "cuda")
    return model, trainable, optimizer, report


def resume(worker: Worker, model: Any, optimizer: Any, loader: Any) -> int:
    """The step to continue from: that of the newest complete checkpoint (model, optimizer, data
    position and RNG restored), or 0."""
    from posttrain.training_lib import checkpoint

    latest = checkpoint.latest_checkpoint(worker.checkpoints)
    if latest is None:
        return 0
    step, loader_state = checkpoint.load(latest, model, optimizer, worker.rank)
    loader.load_state_dict(loader_state)
    if worker.rank == 0:
        print(f"resumed from {latest} at step {step}", flush=True)
    return step


def announce(worker: Worker, trainable: list, report: Any, data: str) -> None:
    if worker.rank == 0:
        print(f"plan: {json.dumps(worker.plan.as_dict())}; {sum(p.numel() for p in trainable)} trainable "
              f"parameters on {worker.world} workers; {data}; rank 0 read {report.bytes_read / 2**20:.1f} MiB of "
              f"the {report.full_bytes / 2**20:.1f} MiB model", flush=True)


def step_logger(worker: Worker, max_steps: int, start_step: int) -> Any:
    """Per-step metrics to train/metrics.jsonl (and MLflow on rank 0), continuing at `start_step`."""
    from posttrain.training_lib.metrics import make_step_logger

    return make_step_logger(worker.recipe, worker.workspace, worker.rank, worker.world, worker.device, max_steps,
                            worker.plan.as_dict(), start_step=start_step)


def packed_micro_batches(worker: Worker, loader: Any) -> tuple[list[dict], Any]:
    """The step's `grad_accum` micro-batches of packed blocks on the device, and the number of
    target tokens in the whole step over all data-parallel ranks (what the summed loss is divided by)."""
    import torch
    import torch.distributed as dist

    micro = [{k: v.to(worker.device) for k, v in loader.next_batch().items()} for _ in range(worker.t.grad_accum)]
    targets = torch.tensor(float(sum(int((b["labels"] != -100).sum()) for b in micro)), device=worker.device)
    dist.all_reduce(targets, group=worker.dp_group)
    return micro, targets


def set_learning_rate(worker: Worker, optimizer: Any, step: int, max_steps: int) -> float:
    from posttrain.training_lib.schedule import learning_rate

    t = worker.t
    lr = learning_rate(step, t.learning_rate, max_steps, t.warmup_steps, t.lr_schedule)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def maybe_checkpoint(worker: Worker, step: int, max_steps: int, model: Any, optimizer: Any, loader: Any) -> None:
    from posttrain.training_lib import checkpoint

    if step % worker.plan.checkpoint_every == 0 or step == max_steps:
        checkpoint.save(worker.checkpoints, step, model, optimizer, loader.state_dict(), worker.rank,
                        worker.plan.keep_checkpoints)


def finish(worker: Worker, model: Any, logger: Any, max_steps: int, extra: dict | None = None) -> None:
    """Close the metrics (and the MLflow run), export the model, write train/summary.json."""
    import torch.distributed as dist

    from posttrain.training_lib.export import export
    from posttrain.training_lib.metrics import read_metrics, summarize_rows

    logger.close()
    model_dir = export(model, worker.recipe, worker.workspace, worker.rank)
    if worker.rank == 0:
        summary = {"steps": max_steps, **summarize_rows(read_metrics(worker.workspace / "train" / "metrics.jsonl")),
                   "model_dir": str(model_dir) if model_dir else None, "plan": worker.plan.as_dict(), **(extra or {})}
        (worker.workspace / "train" / "summary.json").write_text(json.dumps(summary, indent=2))
    dist.barrier()


def fit(recipe: Recipe, workspace: Path, train_loop: Callable[[dict], None]) -> dict:
    """The Ray job driver: run `train_loop` on `compute.workers` Ray Train workers (retried up to
    twice on a lost worker; the loop resumes from its checkpoints) and return train/summary.json."""
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
