"""The training job on a local Ray head, as the operators submit it: streaming packing on 2 FSDP
workers, checkpoints, and a second submission that resumes from the last checkpoint instead of
starting over (what an Airflow retry of the train task does)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from posttrain.hooks.ray import TERMINAL_STATES, LocalRayCluster, RayJobHook
from posttrain.recipe import load_recipe
from posttrain.training_lib.data.prepare import prepare
from tests.conftest import write_recipe


def run_job(cluster: dict, workspace: Path, job_id: str) -> tuple[str, str]:
    hook = RayJobHook(address=cluster["dashboard_url"], token_file=cluster["token_file"])
    hook.submit_job(f"{cluster['python']} -m posttrain.training_lib.entrypoint train --workspace file://{workspace}",
                    job_id)
    deadline = time.monotonic() + 300
    while (status := hook.get_job(job_id)["status"]) not in TERMINAL_STATES:
        assert time.monotonic() < deadline, "training job did not finish in 300 s"
        time.sleep(1)
    return status, hook.get_job_logs(job_id)


def test_streaming_training_checkpoints_and_resumes(tmp_path: Path, tiny_model: Path) -> None:
    recipe_path = write_recipe(tmp_path, name="stream", data={"packing": {"mode": "streaming", "buffer_docs": 64},
                                                              "train_on": "last_assistant_turn"},
                               training={"max_steps": 4, "checkpoint_every": 2, "keep_checkpoints": 5})
    recipe = load_recipe(recipe_path)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "recipe.json").write_text(recipe.model_dump_json())
    manifest = prepare(recipe, workspace)
    assert manifest["splits"]["train"]["layout"] == "documents"
    assert manifest["splits"]["eval"]["layout"] == "blocks"

    cluster = LocalRayCluster.start(num_cpus=3)
    try:
        status, logs = run_job(cluster, workspace, "stream-1")
        assert status == "SUCCEEDED", logs[-3000:]
        assert "(streaming packing)" in logs
        steps = [json.loads(x)["step"] for x in (workspace / "train" / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4]
        assert sorted(p.name for p in (workspace / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]

        # A retry with more steps to go picks up at step 4.
        (workspace / "recipe.json").write_text(
            recipe.model_copy(update={"training": recipe.training.model_copy(update={"max_steps": 6})})
            .model_dump_json())
        status, logs = run_job(cluster, workspace, "stream-2")
        assert status == "SUCCEEDED", logs[-3000:]
        assert f"resumed from {workspace}/checkpoints/step-00000004 at step 4" in logs
        steps = [json.loads(x)["step"] for x in (workspace / "train" / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4, 5, 6]
        assert (workspace / "model" / "model.safetensors").exists()
    finally:
        LocalRayCluster.stop(cluster)
    assert LocalRayCluster.processes(cluster) == []
