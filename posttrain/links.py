"""Extra links on the task page: the Ray dashboard of the run's cluster, and the job's page on it;
the training job's MLflow run and the registered model version, where an MLflow UI serves the store.

Airflow 3 serves a link from the XCom its operator pushed under the link's `xcom_key` (the API
server never imports the provider), so the operators push the URL when they know it.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperatorLink


class RayDashboardLink(BaseOperatorLink):
    name = "Ray dashboard"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        from airflow.providers.common.compat.sdk import XCom

        return XCom.get_value(key=self.xcom_key, ti_key=ti_key) or ""

    @classmethod
    def persist(cls, context: Any, url: str | None) -> None:
        if url:
            context["ti"].xcom_push(key=cls().xcom_key, value=url)


class MlflowRunLink(RayDashboardLink):
    """The training job's MLflow run (train and promote), where an MLflow UI serves the store."""

    name = "MLflow run"


class MlflowModelVersionLink(RayDashboardLink):
    """The model version registered for this run (promote)."""

    name = "MLflow model version"


class RunReportLink(BaseOperatorLink):
    """The run's report.html (report and promote tasks): its storage URL, from the task's workspace.

    The task runner calls get_link when a task ends and stores what it returns for the UI, so this
    needs no XCom of its own: promote's link names the report its run's report task writes next.
    Airflow's UI does not serve workspace files; a file:// or s3:// URL opens where the viewer's
    browser or tools reach the store."""

    name = "Run report"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        from posttrain.report.build import REPORT

        workspace = getattr(operator, "workspace", None)
        if not isinstance(workspace, str) or "{{" in workspace or not workspace.strip():
            return ""  # not rendered: the task never ran (no workspace to point at)
        uri = f"{workspace.rstrip('/')}/{REPORT}"
        return uri if "://" in uri else f"file://{uri}"
