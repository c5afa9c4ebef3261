"""What every training worker does, whatever its loop: find its place in the job (ranks, device,
plan, mesh), build the parallel model and its optimizer, resume from the newest complete
checkpoint, set the step's learning rate, checkpoint, log steps, and export at the end.

Both the Ray Train workers of the SFT, DPO and KD trainers (`start_worker`) and the GRPO policy
actors, which form their own process group (`make_worker`), use it; each keeps only its own loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import ray.train
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from posttrain.planning import Plan
from posttrain.prep.packing import IGNORE
from posttrain.recipe import Recipe, TrainingConfig
from posttrain.storage_fs import Store
from posttrain.training_lib import checkpoint
from posttrain.training_lib.export import export_to_workspace
from posttrain.training_lib.metrics import StepLogger, make_step_logger, summarize_rows
from posttrain.training_lib.models.sharded_load import LoadReport
from posttrain.training_lib.parallel.parallelize import build_parallel_model, make_mesh
from posttrain.training_lib.parallel.plan import make_plan
from posttrain.training_lib.schedule import learning_rate


@dataclass
class Worker:
    """This worker's place in the job."""

    recipe: Recipe
    workspace: Store  # a local folder or an object-store prefix: the job writes nothing of it elsewhere
    rank: int
    world: int
    device: str
    plan: Plan
    mesh: DeviceMesh  # ("dp", "tp")
    logger: StepLogger | None = None  # the loop's (step_logger), flushed with every checkpoint

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
    def checkpoints(self) -> Store:
        return self.workspace / "checkpoints"


def choose_device(recipe: Recipe) -> str:
    """"cuda" where the recipe asks for GPUs and this process sees one, else "cpu"."""
    return "cuda" if torch.cuda.is_available() and recipe.compute.gpus_per_worker > 0 else "cpu"


def make_worker(recipe: Recipe, workspace: Store, rank: int, world: int, device: str) -> Worker:
    """The worker of an already joined process group: the plan for its devices, the recipe's seed,
    the ("dp", "tp") mesh."""
    plan = make_plan(recipe, world, device)
    torch.manual_seed(recipe.training.seed)
    return Worker(recipe, workspace, rank, world, device, plan, make_mesh(plan, device))


def start_worker(config: dict) -> Worker:
    """A Ray Train worker (its process group is Ray Train's), from the train loop's config."""
    recipe = Recipe.model_validate(config["recipe"])
    ctx = ray.train.get_context()
    return make_worker(recipe, Store.at(config["workspace"]), ctx.get_world_rank(), ctx.get_world_size(),
                       choose_device(recipe))


def build_model(worker: Worker) -> tuple[torch.nn.Module, list[torch.nn.Parameter], torch.optim.Optimizer,
                                         LoadReport]:
    """(model, trainable parameters, AdamW over them, LoadReport): each rank reads only its shards."""
    model, report = build_parallel_model(worker.recipe, worker.plan, worker.mesh)
    trainable = [p for p in model.parameters() if p.requires_grad]
    t = worker.t
    # Fused on GPUs: one kernel for the whole update (it takes FSDP2's DTensors; benchmarks/train_step.py).
    optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay,
                                  fused=worker.device == "cuda")
    return model, trainable, optimizer, report


def resume(worker: Worker, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           loader: Any = None) -> tuple[int, dict | None]:
    """Restore the newest complete checkpoint (model, optimizer, RNG) and return its step and the
    state saved with it (a loader's data position, or the GRPO controller's); (0, None) without
    one. Given the `loader`, its position is restored too and rank 0 says where training resumed."""
    latest = checkpoint.latest_checkpoint(worker.checkpoints)
    if latest is None:
        return 0, None
    step, state = checkpoint.load(latest, model, optimizer, worker.rank)
    if loader is not None:
        loader.load_state_dict(state)
        if worker.rank == 0:
            print(f"resumed from {latest} at step {step}", flush=True)
    return step, state


def set_learning_rate(worker: Worker, optimizer: torch.optim.Optimizer, step: int, max_steps: int) -> float:
    """The recipe's LR schedule at optimizer step `step` (1-based), set on every parameter group."""
    t = worker.t
    lr = learning_rate(step, t.learning_rate, max_steps, t.warmup_steps, t.lr_schedule)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def announce(worker: Worker, trainable: list[torch.nn.Parameter], report: LoadReport, data: str) -> None:
    if worker.rank == 0:
        print(f"plan: {json.dumps(worker.plan.as_dict())}; {sum(p.numel() for p in trainable)} trainable "
              f"parameters on {worker.world} workers; {data}; rank 0 read {report.bytes_read / 2**20:.1f} MiB of "
              f"the {report.full_bytes / 2**20:.1f} MiB model", flush=True)


def step_logger(worker: Worker, max_steps: int, start_step: int) -> StepLogger:
    """Per-step metrics to train/metrics.jsonl (and MLflow on rank 0), continuing at `start_step`."""
    worker.logger = make_step_logger(worker.recipe, worker.workspace, worker.rank, worker.world, worker.device,
                                     max_steps, worker.plan.as_dict(), start_step=start_step)
    return worker.logger


def packed_micro_batches(worker: Worker, loader: Any) -> tuple[list[dict], torch.Tensor]:
    """The step's `grad_accum` micro-batches of packed blocks on the device, and the number of
    target tokens in the whole step over all data-parallel ranks (what the summed loss is divided by)."""
    micro = [{k: v.to(worker.device) for k, v in loader.next_batch().items()} for _ in range(worker.t.grad_accum)]
    targets = torch.tensor(float(sum(int((b["labels"] != IGNORE).sum()) for b in micro)), device=worker.device)
    dist.all_reduce(targets, group=worker.dp_group)
    return micro, targets


def checkpoint_due(step: int, max_steps: int, every: int) -> bool:
    """Checkpoints are written every `every` steps and after the last one."""
    return step % every == 0 or step == max_steps


def save(worker: Worker, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Collective: a complete checkpoint of step `step` with `state` (see resume); the plan's
    `keep_checkpoints` newest are kept."""
    checkpoint.save(worker.checkpoints, step, model, optimizer, state, worker.rank, worker.plan.keep_checkpoints)
    if worker.logger is not None:  # the workspace holds the steps up to its newest checkpoint, at least
        worker.logger.flush()


def maybe_checkpoint(worker: Worker, step: int, max_steps: int, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer, loader: Any) -> None:
    if checkpoint_due(step, max_steps, worker.plan.checkpoint_every):
        save(worker, step, model, optimizer, loader.state_dict())


def export_model(worker: Worker, model: torch.nn.Module) -> str | None:
    """Collective: the model in Hugging Face format in the workspace; its URI on rank 0."""
    return export_to_workspace(model, worker.recipe, worker.workspace, worker.rank)


def finish(worker: Worker, model: torch.nn.Module, logger: StepLogger, max_steps: int,
           extra: dict | None = None) -> None:
    """Close the metrics (and the MLflow run), export the model, write train/summary.json."""
    logger.close()
    model_dir = export_model(worker, model)
    if worker.rank == 0:  # after the export: the driver reads the summary
        summary = {"steps": max_steps, **summarize_rows(logger.rows), "model_dir": model_dir,
                   "plan": worker.plan.as_dict(), **(extra or {})}
        (worker.workspace / "train" / "summary.json").write_json(summary)
    dist.barrier()
