"""Stages that run as Ray jobs: submit `posttrain.training_lib.entrypoint <stage>`, then wait in
the triggerer (deferrable) or in the hook here, and fail with the job's last log lines if the job
fails.

No job outlives the try that started it: before submitting try N, the jobs of tries 1..N-1 still
running are stopped and waited for (two tries writing one checkpoint folder would lose data); a
try that fails, times out (execution or deferral timeout) or is killed stops its job. While
deferred, the trigger stops the job when the task is ended from outside (`RayJobTrigger.on_kill`).
"""

from __future__ import annotations

import shlex
from datetime import timedelta
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.configuration import conf
from airflow.sdk.exceptions import AirflowException

from posttrain.hooks.ray_follow import DEFAULT_RETRY_WINDOW_S, TERMINAL_STATES, describe
from posttrain.links import RayDashboardLink
from posttrain.operators.base import PosttrainOperator
from posttrain.paths import safe_name

if TYPE_CHECKING:
    from posttrain.hooks.ray import RayClusterRef, RayJobHook


# Ray Train 2.60 routes a worker's print() to its logger *and* to the stream Ray redirected stdout to:
# every line of a training step would reach the job log (and the task log) twice.
JOB_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


class RayJobFailed(AirflowException):
    pass


class RayJobOperator(PosttrainOperator):
    stage: str = ""
    template_fields = ("workspace", "cluster")
    operator_extra_links = (RayDashboardLink(),)

    def __init__(self, *, cluster: dict[str, Any] | str, poll_interval: float = 2.0, timeout_s: float = 24 * 3600,
                 retry_window_s: float = DEFAULT_RETRY_WINDOW_S, stop_timeout_s: float = 120.0,
                 deferrable: bool | None = None, **kwargs: Any):
        """`timeout_s`: how long the job may run (the deferral timeout while deferred, and the
        task's execution timeout unless one is given); `retry_window_s`: how long the dashboard may
        keep failing transiently (connection refused/reset, 5xx, timeouts) while the job is followed
        before the task fails; `stop_timeout_s`: how long to wait for an earlier try's job to be
        over after stopping it."""
        kwargs.setdefault("execution_timeout", timedelta(seconds=timeout_s))
        super().__init__(**kwargs)
        self.cluster = cluster
        self.poll_interval = poll_interval
        self.timeout_s = timeout_s
        self.retry_window_s = retry_window_s
        self.stop_timeout_s = stop_timeout_s
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

    def job_id_of(self, ti: Any, try_number: int) -> str:
        """One job per try: a retried task submits afresh (and training resumes from its checkpoint)."""
        return safe_name(f"posttrain-{ti.dag_id}-{ti.run_id}-{self.stage}-try{try_number}")

    def stop_earlier_tries(self, ti: Any) -> None:
        """Stop the jobs of this task's earlier tries that are not over, and wait until they are."""
        for try_number in range(1, ti.try_number):
            job_id = self.job_id_of(ti, try_number)
            was = self.hook.stop_and_wait(job_id, timeout=self.stop_timeout_s)
            if was is not None and was not in TERMINAL_STATES:
                self.log.warning("stopped Ray job %s of try %d (it was %s) before starting try %d",
                                 job_id, try_number, was, ti.try_number)

    def stop_job_quietly(self, job_id: str | None, why: str, retry: bool = True) -> None:
        """Best effort: stop the job, logging what happened (the task is failing anyway). With
        `retry`, a dashboard failing transiently is asked again for up to `retry_window_s` (it may
        have been what failed the task); on_kill can't wait that long."""
        if not job_id:
            return
        try:
            if retry:
                was = self.hook.retrying(lambda: self.hook.stop_if_running(job_id), f"stopping Ray job {job_id}",
                                         self.retry_window_s)
            else:
                was = self.hook.stop_if_running(job_id)
            if was is None or was in TERMINAL_STATES:
                self.log.info("Ray job %s is %s (%s): nothing to stop", job_id, was or "unknown to the cluster", why)
                return
            self.log.warning("stopped Ray job %s (%s)", job_id, why)
        except Exception as exc:
            self.log.error("could not stop Ray job %s (%s): %s", job_id, why, describe(exc))

    def execute(self, context: Any) -> Any:
        ti = context["ti"]
        self.job_id = self.job_id_of(ti, ti.try_number)
        self.stop_earlier_tries(ti)
        entrypoint = (f"{shlex.quote(self.cluster_ref.python)} -m posttrain.training_lib.entrypoint "
                      f"{self.stage} --workspace {shlex.quote(self.workspace)}")
        if self.hook.ensure_submitted(entrypoint, self.job_id, self.retry_window_s, runtime_env={"env_vars": JOB_ENV},
                                      metadata={"dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": ti.task_id},
                                      entrypoint_num_cpus=0):
            self.log.info("submitted Ray job %s: %s", self.job_id, entrypoint)
        RayDashboardLink.persist(context, self.cluster_ref.job_url(self.job_id))
        if self.deferrable:
            from posttrain.triggers.ray import RayJobTrigger

            self.defer(trigger=RayJobTrigger(job_id=self.job_id, poll_interval=self.poll_interval,
                                             retry_window_s=self.retry_window_s,
                                             **self.cluster_ref.trigger_kwargs()),
                       method_name="execute_complete", timeout=self.timeout_s)
        try:
            outcome = self.hook.wait_for_job(self.job_id, self.timeout_s, self._log_job_line,
                                             poll_interval=self.poll_interval, retry_window_s=self.retry_window_s)
        except BaseException as exc:  # the dashboard kept failing, or the task is being ended
            self.stop_job_quietly(self.job_id, f"the task stopped waiting for it: {describe(exc)}")
            raise
        return self.execute_complete(context, outcome)

    def _log_job_line(self, line: str) -> None:
        self.log.info("[ray job %s] %s", self.job_id, line)

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> Any:
        if not event:
            raise RayJobFailed(f"{self.task_id}: no event from the Ray job trigger")
        self.job_id = event.get("job_id") or self.job_id
        if event["status"] not in TERMINAL_STATES:  # the trigger gave up on a job that may still run
            self.stop_job_quietly(self.job_id, f"following it failed: {event['message']}")
        if event["status"] != "SUCCEEDED":
            raise RayJobFailed(f"Ray job {event['job_id']} {event['status']}: {event['message']}\n"
                               f"--- last lines of the job log ---\n{event['log_tail']}")
        return self.result(context)

    def resume_execution(self, next_method: str, next_kwargs: dict[str, Any] | None, context: Any) -> Any:
        if next_method == "__fail__":  # the trigger failed or its deferral timeout expired
            ti, error = context["ti"], (next_kwargs or {}).get("error", "unknown")
            self.stop_job_quietly(self.job_id_of(ti, ti.try_number), f"the trigger ended: {error}")
        return super().resume_execution(next_method, next_kwargs, context)

    def result(self, context: Any) -> Any:
        return None

    def on_kill(self) -> None:
        """Called on SIGTERM ("Mark as failed" / "Clear" while the task runs) and when the
        execution timeout expires (Airflow 3.3's task runner does both)."""
        self.stop_job_quietly(self.job_id, "the task was killed", retry=False)
