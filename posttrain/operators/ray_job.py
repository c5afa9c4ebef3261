"""Stages that run as Ray jobs: submit `posttrain.training_lib.entrypoint <stage>`, then wait in
the triggerer (deferrable) or here, and fail with the job's last log lines if the job fails."""

from __future__ import annotations

import shlex
import time
from typing import Any

from airflow.configuration import conf
from airflow.sdk.exceptions import AirflowException

from posttrain.links import RayDashboardLink
from posttrain.operators.base import PosttrainOperator
from posttrain.paths import safe_name


class RayJobFailed(AirflowException):
    pass


class RayJobOperator(PosttrainOperator):
    stage: str = ""
    template_fields = ("workspace", "cluster")
    operator_extra_links = (RayDashboardLink(),)

    def __init__(self, *, cluster: dict[str, Any] | str, poll_interval: float = 2.0, timeout_s: float = 24 * 3600,
                 deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=True), **kwargs: Any):
        super().__init__(**kwargs)
        self.cluster = cluster
        self.poll_interval = poll_interval
        self.timeout_s = timeout_s
        self.deferrable = deferrable
        self.job_id: str | None = None

    def hook(self):
        from posttrain.hooks.ray import RayJobHook

        c = self.cluster
        return RayJobHook(address=c.get("dashboard_url"), ray_conn_id=c.get("ray_conn_id", "ray_default"),
                          token_file=c.get("token_file"))

    def execute(self, context: Any) -> Any:
        ti = context["ti"]
        # One job per try: a retried task submits afresh (and training resumes from its checkpoint).
        self.job_id = safe_name(f"posttrain-{ti.dag_id}-{ti.run_id}-{self.stage}-try{ti.try_number}")
        hook = self.hook()
        if hook.get_job(self.job_id) is None:
            entrypoint = (f"{shlex.quote(self.cluster.get('python', 'python'))} -m posttrain.training_lib.entrypoint "
                          f"{self.stage} --workspace {shlex.quote(self.workspace)}")
            hook.submit_job(entrypoint, self.job_id, metadata={"dag_id": ti.dag_id, "run_id": ti.run_id,
                                                               "task_id": ti.task_id}, entrypoint_num_cpus=0)
            self.log.info("submitted Ray job %s: %s", self.job_id, entrypoint)
        if self.cluster.get("dashboard_url"):
            RayDashboardLink.persist(context, f"{self.cluster['dashboard_url'].rstrip('/')}/#/jobs/{self.job_id}")
        if self.deferrable:
            from posttrain.triggers.ray import RayJobTrigger

            self.defer(trigger=RayJobTrigger(job_id=self.job_id, address=self.cluster.get("dashboard_url"),
                                             ray_conn_id=self.cluster.get("ray_conn_id", "ray_default"),
                                             token_file=self.cluster.get("token_file"),
                                             poll_interval=self.poll_interval),
                       method_name="execute_complete", timeout=self.timeout_s)
        return self.execute_complete(context, self._wait(hook))

    def _wait(self, hook: Any) -> dict[str, Any]:
        from posttrain.hooks.ray import TERMINAL_STATES, job_outcome

        deadline, seen = time.monotonic() + self.timeout_s, 0
        while True:
            job, logs = hook.get_job(self.job_id), hook.get_job_logs(self.job_id)
            for line in logs[seen:].splitlines():
                self.log.info("[ray job %s] %s", self.job_id, line)
            seen = len(logs)
            if job["status"] in TERMINAL_STATES:
                return job_outcome(self.job_id, job, logs)
            if time.monotonic() > deadline:
                hook.stop_job(self.job_id)
                raise RayJobFailed(f"Ray job {self.job_id} did not finish within {self.timeout_s:.0f}s; stopped it")
            time.sleep(self.poll_interval)

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
            self.hook().stop_job(self.job_id)
