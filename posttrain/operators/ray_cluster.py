"""The Ray cluster a run trains on: set up before training, torn down after, whatever happened.

`local`: a Ray head on 127.0.0.1 started by this task. `ray`: an existing cluster named by an
Airflow connection (nothing to start or stop).
"""

from __future__ import annotations

from typing import Any

from posttrain.operators.base import PosttrainOperator


class RayClusterOperator(PosttrainOperator):
    """Setup task: returns the cluster's address, dashboard URL and whatever teardown needs."""

    ui_color = "#e6f4ea"

    def execute(self, context: Any) -> dict[str, Any]:
        from posttrain.hooks.ray import LocalRayCluster, RayJobHook

        compute = self.load_recipe().compute
        if compute.provider == "local":
            info = LocalRayCluster.start(num_cpus=compute.workers * compute.cpus_per_worker + 1,
                                         timeout=compute.startup_timeout_s)
        else:
            hook = RayJobHook(ray_conn_id=compute.ray_conn_id)
            hook.wait_ready(compute.startup_timeout_s)
            info = {"provider": "ray", "ray_conn_id": compute.ray_conn_id, "python": "python"}
        self.storage.write_json_atomic(f"{self.workspace}/cluster.json", info)
        self.log.info("Ray cluster ready: %s", info.get("dashboard_url") or info.get("ray_conn_id"))
        return info


class RayClusterTeardownOperator(PosttrainOperator):
    """Teardown task: stops what the setup task started. The cluster comes from the setup task's
    XCom, or, when that is gone, from the workspace's cluster.json (a deleted workspace must not
    leave a head running, and neither may a lost XCom)."""

    template_fields = ("workspace", "cluster")
    ui_color = "#fce8e6"

    def __init__(self, *, cluster: dict[str, Any] | str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.cluster = cluster

    def _cluster_info(self) -> dict[str, Any] | None:
        if isinstance(self.cluster, dict) and self.cluster:
            return self.cluster
        uri = f"{self.workspace}/cluster.json"
        return self.storage.read_json(uri) if self.workspace and self.storage.exists(uri) else None

    def execute(self, context: Any) -> dict[str, Any]:
        from posttrain.hooks.ray import LocalRayCluster

        info = self._cluster_info()
        if info is None:
            self.log.info("no cluster was started for this run; nothing to tear down")
            return {"stopped": 0}
        if info["provider"] != "local":
            self.log.info("cluster %s is not ours to stop", info.get("ray_conn_id"))
            return {"stopped": 0}
        stopped = LocalRayCluster.stop(info)
        left = LocalRayCluster.processes(info)
        if left:
            raise RuntimeError(f"{len(left)} Ray processes of cluster {info['cluster_id']} survived the teardown: "
                               + ", ".join(str(p.pid) for p in left))
        self.log.info("stopped Ray head %s (%d processes)", info["cluster_id"], stopped)
        return {"stopped": stopped}
