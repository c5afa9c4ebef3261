"""The whole DAG on the tiny model, twice: the first run trains, evaluates with vLLM and becomes
champion; the second, through `posttrain run` as a user starts it, trains a challenger and is
compared with it, and what it prints is the compact live view (the rest goes to its log file)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from posttrain.hooks.local_ray import LocalRayCluster
from posttrain.promotion_stats import read_table
from posttrain.recipe import load_recipe
from posttrain.uris import local_path
from tests.conftest import run_recipe, task_states, workspace_of, write_recipe

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("airflow_db")]


def posttrain_run(recipe_path: Path, log: Path) -> tuple[Any, str]:
    """`posttrain run` in its own process (its stdout a pipe, as in CI), on this session's metadata
    database: the DAG run it made and what it printed."""
    from airflow.models import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    done = subprocess.run([sys.executable, "-m", "posttrain", "run", str(recipe_path), "--log", str(log)],
                          capture_output=True, text=True, env=os.environ.copy(), timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == "", done.stderr
    with create_session() as session:
        dag_run = session.scalars(select(DagRun).where(DagRun.dag_id == load_recipe(recipe_path).dag_id)
                                  .order_by(DagRun.id.desc())).first()
        session.expunge(dag_run)
    return dag_run, done.stdout


def test_tiny_sft_end_to_end_champion_then_challenger(tmp_path: Path, tiny_model: Path) -> None:
    recipe_path = write_recipe(tmp_path, name="e2e-sft", training={"max_steps": 6, "checkpoint_every": 3})
    recipe = load_recipe(recipe_path)

    first = run_recipe(recipe_path)
    states = task_states(first)
    assert set(states.values()) == {"success"}, states
    ws = workspace_of(recipe_path, first)

    manifest = json.loads((ws / "data" / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    assert train["rows"] == 400 and train["fill_ratio"] > 0.9
    assert train["documents"] + train["dropped_overlong"] + train["dropped_no_target"] == train["rows"]
    assert len(manifest["tokenizer"]["fingerprint"]) == 16

    summary = json.loads((ws / "train" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["last_loss"] < summary["first_loss"]
    assert summary["plan"]["strategy"] == "fsdp" and summary["plan"]["world_size"] == 2
    assert sorted(p.name for p in (ws / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    model = ws / "model"
    assert (model / "model.safetensors").exists() and (model / "tokenizer.json").exists()

    metrics = json.loads((ws / "eval" / "metrics.json").read_text())
    assert metrics["eval_loss"] > 0 and 0.0 <= metrics["exact_match"] <= 1.0 and metrics["generated_samples"] == 8
    samples = [json.loads(line) for line in (ws / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all(isinstance(s["generated"], str) for s in samples)
    # The vocabulary is padded past the tokenizer (500 → 512): padding rows are never sampled.
    vocab = manifest["tokenizer"]["size"]
    assert vocab == 500 and all(t < vocab for s in samples for t in s["generated_token_ids"])

    # Per example: every eval row's loss (summing to the aggregate) and the generations.
    columns, _ = read_table(str(ws / "eval" / "per_example.parquet"))
    assert len(columns["example_id"]) == 64 and sum(columns["eval_loss__tokens"]) == metrics["eval_tokens"]
    assert sum(columns["eval_loss__sum"]) / metrics["eval_tokens"] == pytest.approx(metrics["eval_loss"], rel=1e-6)
    assert sum(g is not None for g in columns["generated"]) == 8

    champion = json.loads(local_path(recipe.champion_uri).read_text())
    assert champion["version"] in str(ws) and champion["value"] == metrics["eval_loss"]
    assert local_path(champion["per_example_uri"]).exists()
    assert (local_path(champion["model_uri"]) / "model.safetensors").exists()
    cluster = json.loads((ws / "cluster.json").read_text())
    assert LocalRayCluster.processes(cluster) == []
    # The run report (report.html, the report task's): every panel has data but MFU (no peak FLOP/s
    # is known for a CPU); the first run has no champion to compare with.
    report = (ws / "report.html").read_text()
    assert set(re.findall(r'id="([\w-]+)" data-has-data="false"', report)) <= {"train-mfu"}, report
    assert report.count('src="data:image/png;base64,') == 7 and "No champion yet" in report  # no interval yet

    log = tmp_path / "logs" / "second.log"
    second, printed = posttrain_run(recipe_path, log)
    states = task_states(second)
    lines = printed.splitlines()
    assert len(lines) < 60, printed
    assert lines[0].endswith(f"output goes to {log}") and lines[-1] == f"  full log: {log}"
    assert re.search(r"^\d\d:\d\d:\d\d  train +success in ", printed, re.M), printed
    assert re.search(r"^ +train: step 6/6  loss \d+\.\d{4}  \d+ tokens/s$", printed, re.M), printed
    assert re.search(r"^  promotion: .*interval .* to .*, n=64\)", printed, re.M), printed
    assert "[DAG TEST]" not in printed and "[ray job" not in printed
    # The log holds what the view left out: Airflow's task runner, the Ray job relayed, GX.
    text = log.read_text()
    assert "[DAG TEST] starting task_id=train " in text and "DagRun Finished" in text
    assert re.search(r"\[ray job \S+-train-try1\].* step 6/6 loss", text) and "great_expectations" in text
    ws2 = workspace_of(recipe_path, second)
    decision = json.loads((ws2 / "promotion" / "decision.json").read_text())
    assert decision["previous_champion"]["version"] == champion["version"]
    # Paired with the champion on the same 64 examples (promotion.decision: confidence, the default).
    assert decision["comparison"]["n"] == 64 and "n=64" in decision["reason"]
    if decision["promoted"]:
        assert states["promote"] == "success"
        assert json.loads(local_path(recipe.champion_uri).read_text())["previous_version"] == champion["version"]
    else:
        assert states["promote"] == "skipped" and "champion" in decision["reason"]
        assert json.loads(local_path(recipe.champion_uri).read_text()) == champion
    assert str(second.state) == "success"
    report = (ws2 / "report.html").read_text()
    assert states["report"] == "success" and f"champion {champion['version']}" in report
