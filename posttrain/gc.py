"""`posttrain gc`: terminate EC2 Ray clusters whose DAG run is over.

The teardown task is the first line of defence; this is the second, for what it cannot cover (a
run marked failed from outside, a worker killed before teardown ran, a deleted DAG). A cluster is
terminated when it is older than the threshold and its DAG run, found from the instances' tags in
Airflow's metadata database, is no longer queued or running. A cluster whose run is not in the
database (another deployment's, a database that was reset, a tag typed by hand) is only reported:
`force` terminates it too.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from posttrain.hooks.ec2 import TAG_CLUSTER, TAG_DAG, TAG_RUN, Ec2ClusterHook, tag

ACTIVE = ("queued", "running")


def parse_age(text: str) -> timedelta:
    """`90m`, `6h`, `2d` (a bare number is hours)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not match:
        raise ValueError(f"--older-than {text!r}: expected a number with s, m, h or d (e.g. 6h)")
    value, unit = float(match.group(1)), match.group(2) or "h"
    return timedelta(seconds=value * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit])


def airflow_run_state(dag_id: str, run_id: str) -> str | None:
    """The DAG run's state in the metadata database (None when there is no such run)."""
    from airflow.models import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        state = session.scalar(select(DagRun.state).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
    return None if state is None else str(state)


def collect(hook: Ec2ClusterHook, older_than: timedelta,
            run_state: Callable[[str, str], str | None] = airflow_run_state, dry_run: bool = False,
            now: datetime | None = None, force: bool = False,
            announce: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Terminate the clusters whose run is over. `announce` is called with each cluster's entry and
    the decision (`action`: terminate / keep, `reason`) before anything is terminated."""
    now = now or datetime.now(UTC)
    clusters: dict[str, list[dict]] = {}
    for instance in hook.instances():
        clusters.setdefault(tag(instance, TAG_CLUSTER) or "?", []).append(instance)
    report: dict[str, Any] = {"clusters": len(clusters), "terminated": [], "kept": []}
    for cluster_id, instances in sorted(clusters.items()):
        dag_id, run_id = tag(instances[0], TAG_DAG), tag(instances[0], TAG_RUN)
        age = now - min(i["LaunchTime"] for i in instances)
        state = run_state(dag_id, run_id) if dag_id and run_id else None
        entry = {"cluster_id": cluster_id, "dag_id": dag_id, "run_id": run_id, "run_state": state,
                 "age_h": round(age.total_seconds() / 3600, 2), "instances": [i["InstanceId"] for i in instances]}
        entry["action"], entry["reason"] = decide(age, older_than, state, force)
        (report["terminated"] if entry["action"] == "terminate" else report["kept"]).append(entry)
    for entry in report["terminated"] + report["kept"]:
        if announce is not None:
            announce(entry)
    if not dry_run:
        for entry in report["terminated"]:
            hook.terminate_cluster(entry["cluster_id"])
    return report


def decide(age: timedelta, older_than: timedelta, state: str | None, force: bool) -> tuple[str, str]:
    """("terminate" | "keep", why)."""
    if age < older_than:
        return "keep", f"launched {age} ago, younger than {older_than}"
    if state in ACTIVE:
        return "keep", f"its run is {state}"
    if state is None and not force:
        return "keep", "its run is not in this Airflow's metadata database (--force terminates it)"
    return "terminate", "its run is not in the database (--force)" if state is None else f"its run is {state}"
