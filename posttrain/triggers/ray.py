"""Watching a Ray job from the triggerer: status and new log lines, without holding a worker slot.

All state needed to resume is in the kwargs (address, job id), so a restarted triggerer picks the
job up again from the cluster.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from posttrain.hooks.ray import JobWatch, RayJobHook


class RayJobTrigger(BaseTrigger):
    def __init__(self, job_id: str, address: str | None = None, ray_conn_id: str = "ray_default",
                 token_file: str | None = None, poll_interval: float = 2.0):
        super().__init__()
        self.job_id = job_id
        self.address = address
        self.ray_conn_id = ray_conn_id
        self.token_file = token_file
        self.poll_interval = poll_interval

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}", {
            "job_id": self.job_id, "address": self.address, "ray_conn_id": self.ray_conn_id,
            "token_file": self.token_file, "poll_interval": self.poll_interval})

    async def run(self) -> AsyncIterator[TriggerEvent]:
        hook = RayJobHook(address=self.address, ray_conn_id=self.ray_conn_id, token_file=self.token_file)
        watch = JobWatch(self.job_id, lambda line: self.log.info("[ray job %s] %s", self.job_id, line))
        while True:
            try:
                job, logs = await hook.async_job_and_logs(self.job_id)
            except Exception as exc:  # the cluster went away: report, don't poll forever
                yield TriggerEvent({"status": "ERROR", "job_id": self.job_id, "message": str(exc), "log_tail": ""})
                return
            if (outcome := watch.update(job, logs)) is not None:
                yield TriggerEvent(outcome)
                return
            await asyncio.sleep(self.poll_interval)
