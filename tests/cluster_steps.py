"""One step of a run's cluster in a process of its own, as a real deployment spreads them over
machines: the setup task on one worker, the train task's trigger on a triggerer, the teardown on
another worker (tests/integration/test_cluster_token.py).

`python -m tests.cluster_steps STEP WORKSPACE CONN_ID IN_JSON OUT_JSON`, run with a POSTTRAIN_HOME
and a working directory of its own. Between steps only JSON travels, what Airflow itself carries:
the setup task's return value (its XCom) and the trigger's serialized kwargs. Steps:
- setup: RayClusterOperator → the cluster's info.
- submit: the train task's side: submit a job on the cluster from the info, defer → the trigger's
  classpath and kwargs.
- follow: the triggerer's side: rebuild the trigger from those and run it → its event.
- teardown: RayClusterTeardownOperator with the info → its result.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from pathlib import Path
from typing import Any


class _TaskInstance:
    """What the operators use of a task instance here: the extra link's XCom."""

    dag_id, try_number = "posttrain__tokens", 1

    def xcom_push(self, key: str, value: Any) -> None:
        pass


def _context(run_id: str = "manual__tokens") -> dict[str, Any]:
    return {"ti": _TaskInstance(), "run_id": run_id}


def setup(workspace: str, conn_id: str, _: Any) -> Any:
    from posttrain.operators.ray_cluster import RayClusterOperator

    return RayClusterOperator(task_id="ray_cluster", workspace=workspace, storage_conn_id=conn_id).execute(_context())


def submit(workspace: str, conn_id: str, info: dict[str, Any]) -> Any:
    from posttrain.hooks.ray import RayClusterRef
    from posttrain.triggers.ray import RayJobTrigger

    ref = RayClusterRef.from_info(info)
    job = ref.hook().submit_job(f"{ref.python} -c \"print('hello from the run cluster')\"", "posttrain-tokens-job")
    classpath, kwargs = RayJobTrigger(job_id=job, poll_interval=0.5, **ref.trigger_kwargs()).serialize()
    return {"classpath": classpath, "kwargs": kwargs}


def follow(workspace: str, conn_id: str, deferred: dict[str, Any]) -> Any:
    module, name = deferred["classpath"].rsplit(".", 1)
    trigger = getattr(importlib.import_module(module), name)(**deferred["kwargs"])

    async def first_event() -> dict[str, Any]:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    return asyncio.run(asyncio.wait_for(first_event(), timeout=120))


def teardown(workspace: str, conn_id: str, info: dict[str, Any]) -> Any:
    from posttrain.operators.ray_cluster import RayClusterTeardownOperator

    return RayClusterTeardownOperator(task_id="ray_cluster_teardown", workspace=workspace, storage_conn_id=conn_id,
                                      cluster=info).execute(_context())


def main() -> int:
    step, workspace, conn_id, given, out = sys.argv[1:6]
    value = json.loads(Path(given).read_text()) if given != "-" else None
    result = {"setup": setup, "submit": submit, "follow": follow, "teardown": teardown}[step](workspace, conn_id, value)
    Path(out).write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
