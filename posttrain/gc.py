"""`posttrain gc`: terminate EC2 Ray clusters whose DAG run is over.

The teardown task is the first line of defence; this is the second, for what it cannot cover (a
run marked failed from outside, a worker killed before teardown ran, a deleted DAG). A cluster is
terminated when it is older than the threshold and its DAG run, found from the instances' tags in
Airflow's metadata database, is no longer queued or running.
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
            now: datetime | None = None) -> dict[str, Any]:
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
        if age < older_than or state in ACTIVE:
            report["kept"].append(entry)
            continue
        if not dry_run:
            hook.terminate_cluster(cluster_id)
        report["terminated"].append(entry)
    return report
