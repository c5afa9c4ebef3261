"""The Ray Train driver the SFT, DPO and KD trainers share. What their workers share is in
training_lib/runtime.py; each trainer module keeps only its own loop."""

from __future__ import annotations

from collections.abc import Callable

from pyarrow.fs import FSSpecHandler, PyFileSystem
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from posttrain.prep.tokenizer import require_same_tokenizer
from posttrain.recipe import Recipe
from posttrain.storage_fs import Store


def run_config(workspace: Store) -> RunConfig:
    """Ray Train keeps its own run state in the workspace's ray_train/ (on an object store through
    the workspace's filesystem, so it reaches the same endpoint with the same credentials)."""
    storage = workspace / "ray_train"
    failures = FailureConfig(max_failures=2)
    if storage.local is not None:
        return RunConfig(name="train", storage_path=str(storage.local), failure_config=failures)
    return RunConfig(name="train", storage_path=storage.path, failure_config=failures,
                     storage_filesystem=PyFileSystem(FSSpecHandler(storage.fs)))


def fit(recipe: Recipe, workspace: Store, train_loop: Callable[[dict], None]) -> dict:
    """The Ray job driver: run `train_loop` on `compute.workers` Ray Train workers (retried up to
    twice on a lost worker; the loop resumes from its checkpoints) and return train/summary.json."""
    # Refuse before any worker starts: ids prepared by another tokenizer would train silently wrong.
    require_same_tokenizer(recipe.tokenizer_uri, workspace)
    c = recipe.compute
    use_gpu = c.gpus_per_worker > 0
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"recipe": recipe.model_dump(mode="json"), "workspace": workspace.uri},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=c.workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if use_gpu else {})}),
        run_config=run_config(workspace),
    )
    trainer.fit()
    return (workspace / "train" / "summary.json").read_json()
