"""report: the run's `report.html` (posttrain/report), written last, whatever happened before it.

The DAG makes it a teardown without setups: it runs once everything upstream is done (succeeded,
failed or skipped), like trigger_rule all_done, but the run's state is still decided by the tasks
before it, so a failed training is a failed run with a report, and a report that cannot be written
never fails a run that trained and promoted."""

from __future__ import annotations

from typing import Any

from posttrain.links import RunReportLink
from posttrain.operators.base import PosttrainOperator
from posttrain.report.build import REPORT


def task_durations(context: Any) -> list[dict[str, Any]]:
    """Every other task of this DAG run in the DAG's order, with its state and wall time in seconds
    (None until it finished), from the run's task instances (the Task SDK's breadcrumbs: the
    finished ones)."""
    ti = context["ti"]
    done = {}
    for crumb in ti.get_task_breadcrumbs(dag_id=ti.dag_id, run_id=ti.run_id):
        index = crumb.get("map_index", -1)
        key = crumb["task_id"] if index is None or index < 0 else f"{crumb['task_id']}[{index}]"
        done[key] = {"task_id": key, "state": str(crumb.get("state") or ""), "duration": crumb.get("duration")}
    order = [t for t in context["dag"].task_ids if t != ti.task_id]
    listed = [done.pop(t, {"task_id": t, "state": None, "duration": None}) for t in order]
    return listed + sorted(done.values(), key=lambda t: t["task_id"])  # mapped instances last


class ReportOperator(PosttrainOperator):
    ui_color = "#f1f3f4"
    operator_extra_links = (RunReportLink(),)

    def lineage(self, recipe: Any) -> tuple[list[str], list[str]]:
        return [], [f"{self.workspace}/{REPORT}"]

    def render_template_fields(self, context: Any, jinja_env: Any = None) -> None:
        """Skipped, not failed, when the run never got a workspace (resolve_recipe failed): there is
        nothing to report on, and its log already says why."""
        from airflow.sdk.exceptions import AirflowSkipException, XComNotFound

        try:
            super().render_template_fields(context, jinja_env)
        except XComNotFound as exc:
            raise AirflowSkipException(f"no run workspace to report on ({exc})") from exc
        if not self.workspace:
            raise AirflowSkipException("no run workspace to report on")

    def execute(self, context: Any) -> dict[str, Any]:
        from posttrain.report.build import write_report

        try:
            tasks = task_durations(context)
        except Exception as exc:  # the report still shows everything else; its tasks panel says why
            self.log.warning("no task durations for the report: %s", exc)
            tasks = []
        uri, report = write_report(self.workspace, tasks, locate=self.storage.store)
        without = [p.key for p in report.panels if not p.has_data]
        self.log.info("run report: %s (%d panels, without data: %s)", uri, len(report.panels),
                      ", ".join(without) or "none")
        for problem in report.run.problems:
            self.log.warning("report: %s", problem)
        return {"report": uri, "panels": len(report.panels), "without_data": without,
                "problems": len(report.run.problems)}
