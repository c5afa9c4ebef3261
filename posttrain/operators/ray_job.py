"""Stages that run as Ray jobs: submit `posttrain.training_lib.entrypoint <stage>`, then wait in
the triggerer (deferrable) or in the hook here, and fail with the job's last log lines if the job
fails."""

from __future__ import annotations

import shlex
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.configuration import conf
from airflow.sdk.exceptions import AirflowException

from posttrain.links import RayDashboardLink
from posttrain.operators.base import PosttrainOperator
from posttrain.paths import safe_name

if TYPE_CHECKING:
    from posttrain.hooks.ray import RayClusterRef, RayJobHook


class RayJobFailed(AirflowException):
    pass


class RayJobOperator(PosttrainOperator):
    stage: str = ""
    template_fields = ("workspace", "cluster")
    operator_extra_links = (RayDashboardLink(),)

    def __init__(self, *, cluster: dict[str, Any] | str, poll_interval: float = 2.0, timeout_s: float = 24 * 3600,
                 deferrable: bool | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.cluster = cluster
        self.poll_interval = poll_interval
        self.timeout_s = timeout_s
        # Read when the DAG is built, not when this module is imported.
        self.deferrable = (conf.getboolean("operators", "default_deferrable", fallback=True)
                           if deferrable is None else deferrable)
        self.job_id: str | None = None

    # `cluster` is templated (the setup task's XCom): both are first read in execute or on_kill,
    # after it is rendered.
    @cached_property
    def cluster_ref(self) -> RayClusterRef:
        from posttrain.hooks.ray import RayClusterRef

        return RayClusterRef.from_info(self.cluster)

    @cached_property
    def hook(self) -> RayJobHook:
        return self.cluster_ref.hook()

    def execute(self, context: Any) -> Any:
        ti = context["ti"]
        # One job per try: a retried task submits afresh (and training resumes from its checkpoint).
        self.job_id = safe_name(f"posttrain-{ti.dag_id}-{ti.run_id}-{self.stage}-try{ti.try_number}")
        if self.hook.get_job(self.job_id) is None:
            entrypoint = (f"{shlex.quote(self.cluster_ref.python)} -m posttrain.training_lib.entrypoint "
                          f"{self.stage} --workspace {shlex.quote(self.workspace)}")
            self.hook.submit_job(entrypoint, self.job_id, metadata={"dag_id": ti.dag_id, "run_id": ti.run_id,
                                                                    "task_id": ti.task_id}, entrypoint_num_cpus=0)
            self.log.info("submitted Ray job %s: %s", self.job_id, entrypoint)
        RayDashboardLink.persist(context, self.cluster_ref.job_url(self.job_id))
        if self.deferrable:
            from posttrain.triggers.ray import RayJobTrigger

            self.defer(trigger=RayJobTrigger(job_id=self.job_id, poll_interval=self.poll_interval,
                                             **self.cluster_ref.trigger_kwargs()),
                       method_name="execute_complete", timeout=self.timeout_s)
        return self.execute_complete(context, self.hook.wait_for_job(
            self.job_id, self.timeout_s, self._log_job_line, poll_interval=self.poll_interval))

    def _log_job_line(self, line: str) -> None:
        self.log.info("[ray job %s] %s", self.job_id, line)

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> Any:
        if not event:
            raise RayJobFailed(f"{self.task_id}: no event from the Ray job trigger")
        if event["status"] != "SUCCEEDED":
            raise RayJobFailed(f"Ray job {event['job_id']} {event['status']}: {event['message']}\n"
                               f"--- last lines of the job log ---\n{event['log_tail']}")
        return self.result(context)

    def result(self, context: Any) -> Any:
        return None

    def on_kill(self) -> None:
        if self.job_id:
            self.hook.stop_job(self.job_id)
