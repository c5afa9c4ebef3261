"""What `posttrain run` prints after a run: task states and the numbers a user looks at first."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from posttrain.paths import run_workspace
from posttrain.recipe import Recipe
from posttrain.storage_fs import Store


def _read(path: Store) -> Any:
    return path.read_json() if path.exists() else None


def run_summary(recipe: Recipe, run_id: str, task_states: dict[str, str], run_state: str,
                task_table: bool = True) -> str:
    """The run's numbers; `task_table=False` counts the task states on one line (the live view
    already showed each task)."""
    # A local folder or the bucket (reached with the AWS_* of this environment).
    workspace = Store.at(run_workspace(recipe.storage.root, recipe.name, run_id))
    lines = [f"{recipe.dag_id}  run {run_id}: {run_state}", f"  workspace {workspace}"]
    if task_table:
        lines += ["  tasks:"] + [f"    {task:<22} {state}" for task, state in task_states.items()]
    else:
        counts = Counter(task_states.values())
        lines.append("  tasks: " + ", ".join(f"{n} {state}" for state, n in counts.most_common()))
    if manifest := _read(workspace / "data" / "manifest.json"):
        for split, s in manifest["splits"].items():
            if "blocks" in s:
                lines.append(f"  data/{split}: {s['rows']} rows, {s['tokens']} tokens → {s['blocks']} blocks of "
                             f"{manifest['max_seq_len']} (fill {s['fill_ratio']:.1%}, {s['truncated']} truncated, "
                             f"{s['layout']} layout)")
            else:
                lines.append(f"  data/{split}: {s['rows']} rows, {s['tokens']} tokens ({s['layout']} layout)")
    if train := _read(workspace / "train" / "summary.json"):
        lines.append(f"  train: {train['steps']} steps, loss {train['first_loss']:.4f} → {train['last_loss']:.4f}")
    if metrics := _read(workspace / "eval" / "metrics.json"):
        lines.append("  eval: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in metrics.items()))
    if decision := _read(workspace / "promotion" / "decision.json"):
        verdict = f"promoted as {decision['version']}" if decision["promoted"] else "kept the champion"
        lines.append(f"  promotion: {verdict}: {decision['reason']}")
    if champion := _read(Store.at(recipe.champion_uri)):
        lines.append(f"  champion: {champion['version']} ({champion['metric']} {champion['value']:.4f}) "
                     f"at {champion['model_uri']}")
    return "\n".join(lines)


def print_summary(recipe: Recipe, dag_run: Any, out: TextIO | None = None, log_path: Path | None = None) -> int:
    """Print the summary of a finished dag.test() run; 0 if the run succeeded. With `log_path` (the
    run's output went there) the summary is compact and each failed task's last log lines follow."""
    from airflow.models import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        tis = session.scalars(select(TaskInstance).where(TaskInstance.dag_id == dag_run.dag_id,
                                                         TaskInstance.run_id == dag_run.run_id)).all()
        order = {t: i for i, t in enumerate(["resolve_recipe", "validate_data", "prepare_data", "ray_cluster",
                                             "train", "evaluate", "promote", "ray_cluster_teardown"])}
        states = {ti.task_id: str(ti.state) for ti in sorted(tis, key=lambda t: order.get(t.task_id, 99))}
    state = str(dag_run.state)
    out = out or sys.stdout
    out.write("\n" + run_summary(recipe, dag_run.run_id, states, state, task_table=log_path is None) + "\n")
    if log_path is not None:
        from posttrain.live_view import task_log_tail

        for task_id in [t for t, s in states.items() if s == "failed"]:
            out.write(f"  {task_id} failed; its last log lines:\n")
            out.writelines(f"    | {line}\n" for line in task_log_tail(log_path, task_id))
        out.write(f"  full log: {log_path}\n")
    out.flush()
    return 0 if state == "success" else 1
