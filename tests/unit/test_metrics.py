"""Per-step metrics: metrics.jsonl, the progress line, MLflow (a real SQLite tracking store)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.recipe import Recipe, load_recipe
from posttrain.storage_fs import Store
from posttrain.training_lib.metrics import StepLogger, make_step_logger, read_metrics
from posttrain.training_lib.tracking import tracking_uri
from tests.conftest import write_recipe

PLAN = {"strategy": "fsdp", "device": "cpu", "param_dtype": "float32", "world_size": 2}
LOSSES = [2.5, 2.0, 1.5]


def recipe_for(tmp_path: Path, **sections: object) -> Recipe:
    return load_recipe(write_recipe(tmp_path, **sections))


def train(recipe: Recipe, workspace: Path | Store, steps: list[int], start_step: int = 0) -> StepLogger:
    store = Store.at(workspace) if isinstance(workspace, Path) else workspace
    logger = make_step_logger(recipe, store, rank=0, world=2, device="cpu", total_steps=3, plan=PLAN,
                              start_step=start_step)
    for step in steps:
        logger.log(step, LOSSES[step - 1], 1e-3, 0.5, tokens=512)
    logger.close()
    return logger


def test_steps_are_logged_to_mlflow(tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}"
    recipe = recipe_for(tmp_path, tracking={"mlflow_uri": uri, "peak_tflops": 1e-3},
                        model={"base": str(tiny_model), "lora": {"rank": 4}})
    workspace = tmp_path / "storage" / recipe.name / "runs" / "manual__1"
    train(recipe, workspace, [1, 2, 3])  # killed after step 3; its checkpoint was step 2
    train(recipe, workspace, [3], start_step=2)  # the resumed job continues the same MLflow run

    rows = read_metrics(workspace / "train" / "metrics.jsonl")
    assert [r["loss"] for r in rows] == LOSSES  # the killed job's step 3 is dropped, the resumed one's kept
    assert all(r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / 2, abs=0.1) for r in rows)
    assert all(r["mfu"] > 0 for r in rows)  # the tiny model's shape, LoRA, and the peak override
    assert "mfu " in capsys.readouterr().out

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(recipe.name)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "manual__1" and run.info.status == "FINISHED"
    # MLflow keeps every value logged: step 3 from the killed job and again from the resumed one.
    history = client.get_metric_history(run.info.run_id, "loss")
    assert {m.step: m.value for m in history} == {1: 2.5, 2: 2.0, 3: 1.5} and len(history) == 4
    assert {m.step for m in client.get_metric_history(run.info.run_id, "mfu")} == {1, 2, 3}
    params = run.data.params
    assert params["training.learning_rate"] == str(recipe.training.learning_rate)
    assert params["model.lora.target_modules"] == '["q_proj", "v_proj"]'
    assert params["plan.strategy"] == "fsdp" and float(params["flops_per_token"]) > 0
    assert run.data.metrics["summary.last_loss"] == 1.5 and run.data.metrics["summary.tokens"] == 3 * 512


def test_default_tracking_uri(tmp_path: Path) -> None:
    workspace = Store.at(tmp_path / "ws")
    on_files = recipe_for(tmp_path)
    root = on_files.storage.root.removeprefix("file://")
    assert tracking_uri(on_files, workspace) == f"sqlite:///{root}/{on_files.name}/mlflow.db"
    on_s3 = recipe_for(tmp_path, storage={"root": "s3://bucket/prefix"})
    # The run's own database in its workspace (held in the job's memory: SQLite can't sit on S3).
    run = Store.at(f"s3://bucket/prefix/{on_s3.name}/runs/manual__1")
    assert tracking_uri(on_s3, run) == f"{run.uri}/train/mlflow.db"
    explicit = recipe_for(tmp_path, tracking={"mlflow_uri": "http://mlflow.example:5000"})
    assert tracking_uri(explicit, workspace) == "http://mlflow.example:5000"


@pytest.mark.parametrize("uri", ["bogus://nowhere", "sqlite:///{tmp}/not-a-database.db"])
def test_a_broken_tracking_uri_only_warns(tmp_path: Path, uri: str, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "not-a-database.db").write_text("not a database")
    recipe = recipe_for(tmp_path, tracking={"mlflow_uri": uri.format(tmp=tmp_path)})
    workspace = tmp_path / "ws"
    logger = train(recipe, workspace, [1, 2, 3])
    out = capsys.readouterr().out
    assert out.count("warning: MLflow tracking") == 1 and "step 3/3 loss 1.5000" in out
    assert [r["loss"] for r in read_metrics(workspace / "train" / "metrics.jsonl")] == LOSSES
    assert logger.tracker is not None and not logger.tracker.active


def test_records_between_logs_count_every_step(tmp_path: Path) -> None:
    logger = StepLogger(Store.at(tmp_path / "metrics.jsonl"), True, 4, world=1)
    records = [logger.log(step, 1.0, 1e-3, 0.1, tokens=100) for step in (2, 4)]
    assert [r["tokens"] for r in records] == [200, 200]
    assert "mfu" not in records[0]  # no FLOPs or peak known: no MFU
    assert StepLogger(Store.at(tmp_path / "other.jsonl"), False, 4).log(1, 1.0, 1e-3, 0.1, 100)["tokens"] == 100
    assert not (tmp_path / "other.jsonl").exists()


def test_parsing_dags_imports_no_mlflow() -> None:
    code = ("import sys, posttrain.dags.factory; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'torch', 'pynvml'}))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"
