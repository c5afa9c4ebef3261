"""Watching a Ray job from the triggerer: new log lines as they are written, then the outcome,
without holding a worker slot.

The log is followed as a stream (`posttrain.hooks.ray_follow`): each line reaches the task log once
and in order, and what the trigger holds stays bounded at any log length (the last lines for the
failure message, one unfinished line). All a trigger needs is in its kwargs (cluster, job id), so
a restarted triggerer follows the job again from its id; it re-reads the log from its first line
(the dashboard's stream has no offset, and Airflow persists a trigger's kwargs only at deferral),
so after a triggerer restart the task log holds the lines before the restart twice, after a line
saying the log is followed again from its start.

Stopping: when the task is ended from outside while deferred ("Mark as failed", "Clear", "Mark as
success" on the task or its run), Airflow 3.3 cancels the trigger and calls `on_kill()`; the job is
stopped there unless the task instance is still DEFERRED (the trigger merely moved to another
triggerer). A triggerer that shuts down or restarts doesn't call `on_kill()`: the job goes on. On
the deferral timeout the task resumes on a worker, which stops the job (`RayJobOperator`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from posttrain.hooks.ray import RayJobHook
from posttrain.hooks.ray_follow import DEFAULT_RETRY_WINDOW_S, describe

# How long on_kill waits for the task's state before it stops the job anyway.
STATE_READ_TIMEOUT_S = 10.0
# Stops in flight: asyncio keeps only weak references to tasks.
_STOPPING: set[asyncio.Task] = set()


def should_stop_job_on_kill(task_state: str | None, read_error: str | None = None) -> tuple[bool, str]:
    """Whether a cancelled trigger stops its Ray job, and why. `task_state`: the task instance's
    state as the API server has it now; `read_error`: why it could not be read.

    Only a task that is still DEFERRED keeps its job: its trigger was handed to another triggerer.
    Any other state means someone (a user, the scheduler) ended this try. An unreadable state
    stops the job too: Airflow only calls on_kill after a user action, and a job nobody watches
    is the worse mistake (a retry resumes from the last checkpoint)."""
    if read_error is not None:
        return True, f"the task's state could not be read ({read_error}); stopping the job to be safe"
    if str(task_state).lower().rsplit(".", 1)[-1] == "deferred":
        return False, "the task is still deferred (its trigger moved to another triggerer); the job goes on"
    return True, f"the task is now {task_state or 'cleared'}, no longer deferred"


class RayJobTrigger(BaseTrigger):
    """Follows Ray job `job_id` to its end and fires one event: `job_outcome(...)` (status
    SUCCEEDED / FAILED / STOPPED, message, log tail), or status ERROR when the dashboard could not
    be reached for `retry_window_s` seconds in a row or refused the request (401/403/404)."""

    def __init__(self, job_id: str, address: str | None = None, ray_conn_id: str = "ray_default",
                 token_uri: str | None = None, storage_conn_id: str | None = None, poll_interval: float = 2.0,
                 retry_window_s: float = DEFAULT_RETRY_WINDOW_S, token_file: str | None = None):
        """`token_uri`: where the cluster's token is (the run workspace, read with `storage_conn_id`
        on whichever triggerer runs this); kwargs carry only that place, never the token, since the
        UI shows them. `token_file`: the same as a local path."""
        super().__init__()
        self.job_id = job_id
        self.address = address
        self.ray_conn_id = ray_conn_id
        self.token_uri = token_uri or token_file
        self.storage_conn_id = storage_conn_id
        self.poll_interval = poll_interval
        self.retry_window_s = retry_window_s

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}", {
            "job_id": self.job_id, "address": self.address, "ray_conn_id": self.ray_conn_id,
            "token_uri": self.token_uri, "storage_conn_id": self.storage_conn_id, "poll_interval": self.poll_interval,
            "retry_window_s": self.retry_window_s})

    def hook(self) -> RayJobHook:
        return RayJobHook(address=self.address, ray_conn_id=self.ray_conn_id, token_uri=self.token_uri,
                          storage_conn_id=self.storage_conn_id)

    def log_lines(self, lines: list[str]) -> None:
        for line in lines:
            self.log.info("[ray job %s] %s", self.job_id, line)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        self.log.info("following the log of Ray job %s from its start", self.job_id)
        try:
            outcome = await self.hook().follow_job(self.job_id, self.log_lines, retry_window_s=self.retry_window_s,
                                                   poll_interval=self.poll_interval)
        except Exception as exc:  # not transient, or the dashboard kept failing: the task decides
            yield TriggerEvent({"status": "ERROR", "job_id": self.job_id, "message": describe(exc), "log_tail": ""})
            return
        yield TriggerEvent(outcome)

    async def task_state(self) -> str | None:
        """This trigger's task instance's state, from the API server (through the triggerer's
        supervisor, as `RuntimeTaskInstance.get_task_states` asks it)."""
        from airflow.sdk.execution_time import task_runner
        from airflow.sdk.execution_time.comms import GetTaskStates

        ti = self.task_instance
        if ti is None:
            raise RuntimeError("the trigger runs outside a triggerer (no task instance)")
        response = await task_runner.SUPERVISOR_COMMS.asend(GetTaskStates(
            dag_id=ti.dag_id, task_ids=[ti.task_id], run_ids=[ti.run_id],
            map_index=ti.map_index if ti.map_index is not None and ti.map_index >= 0 else None))
        states = response.task_states.get(ti.run_id, {})
        key = ti.task_id if ti.map_index is None or ti.map_index < 0 else f"{ti.task_id}_{ti.map_index}"
        return states.get(key)

    async def on_kill(self) -> None:
        """Airflow 3.3 calls this when the trigger is cancelled by an action on its task (not on a
        triggerer restart or shutdown, not on the deferral timeout)."""
        # The triggerer cancels the trigger's task again on every pass of its loop until that task
        # has ended, which would cut this short (and Airflow swallows that cancellation): the
        # decision and the stop run in a task of their own, shielded from it.
        task = asyncio.create_task(self._stop_unless_deferred(), name=f"stop Ray job {self.job_id}")
        _STOPPING.add(task)
        task.add_done_callback(_STOPPING.discard)
        await asyncio.shield(task)

    async def _stop_unless_deferred(self) -> None:
        self.log.info("trigger of Ray job %s cancelled by an action on its task: reading the task's state",
                      self.job_id)
        try:
            state, error = await asyncio.wait_for(self.task_state(), timeout=STATE_READ_TIMEOUT_S), None
        except Exception as exc:
            state, error = None, describe(exc) if str(exc) else type(exc).__name__
        stop, why = should_stop_job_on_kill(state, error)
        if not stop:
            self.log.info("trigger of Ray job %s cancelled: %s", self.job_id, why)
            return
        try:
            stopped = await self.hook().async_stop_job(self.job_id)
            self.log.warning("stopped Ray job %s (%s): %s", self.job_id, why,
                             "stop requested" if stopped else "it was already over")
        except Exception as exc:
            self.log.error("could not stop Ray job %s (%s): %s", self.job_id, why, describe(exc))
