"""The cluster is torn down even when training fails, and the task fails with the job's error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from posttrain.hooks.ray import LocalRayCluster
from tests.conftest import run_recipe, task_states, workspace_of, write_recipe


@pytest.mark.usefixtures("airflow_db")
def test_training_failure_still_tears_the_head_down(tmp_path: Path, tiny_model: Path, capfd) -> None:
    # A model folder with the tokenizer but no weights: data preparation works, training cannot.
    broken = tmp_path / "no-weights"
    broken.mkdir()
    for f in tiny_model.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            shutil.copy(f, broken)
    recipe = write_recipe(tmp_path, name="train-fails", model={"base": str(broken)})
    run = run_recipe(recipe)
    states = task_states(run)
    assert states["prepare_data"] == "success" and states["ray_cluster"] == "success"
    assert states["train"] == "failed"
    assert states["evaluate"] == "upstream_failed" and states["promote"] == "upstream_failed"
    assert states["ray_cluster_teardown"] == "success"
    assert str(run.state) == "failed"
    cluster = json.loads((workspace_of(recipe, run) / "cluster.json").read_text())
    assert LocalRayCluster.processes(cluster) == []
    assert not Path(cluster["temp_dir"]).exists()
    out = capfd.readouterr()
    text = out.out + out.err
    assert "Ray job posttrain-posttrain__train-fails" in text and "FAILED" in text
    assert "--- last lines of the job log ---" in text and "config.json" in text
