"""Build the report of a run workspace and write it next to the run's other files."""

from __future__ import annotations

from dataclasses import dataclass

import posttrain.report.panels as panels
from posttrain.report.collect import Locate, RunData, collect
from posttrain.report.page import render
from posttrain.storage_fs import Store

REPORT = "report.html"


@dataclass
class Report:
    html: str
    run: RunData  # what it was made from
    panels: list[panels.Panel]


def build_report(workspace: str, tasks: list[dict] | None = None, locate: Locate = Store.at) -> Report:
    """The report of the workspace at `workspace`. `tasks`: the DAG run's task instances ({task_id,
    state, duration in seconds}); `locate` opens a URI (the Airflow task passes one that reaches the
    store through its storage connection)."""
    run = collect(locate, workspace, tasks)
    sections = [("Training", panels.training(run)),
                (f"Paradigm: {run.paradigm}", panels.paradigm(run)),
                ("Data", panels.data(run)),
                ("Evaluation", panels.evaluation(run)),
                ("Generations", [panels.generations(run)]),
                ("Tasks", [panels.tasks(run)])]
    return Report(render(run, sections), run, [p for _, group in sections for p in group])


def write_report(workspace: str, tasks: list[dict] | None = None, locate: Locate = Store.at) -> tuple[str, Report]:
    """Build the report and write it to `<workspace>/report.html` (one object on a store, replaced
    whole on a disk); returns its URI and the report."""
    report = build_report(workspace, tasks, locate)
    target = locate(f"{workspace.rstrip('/')}/{REPORT}")
    target.write_text(report.html)
    return target.uri, report
