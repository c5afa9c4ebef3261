"""The Ray cluster a run trains on: set up before training, torn down after, whatever happened.

`local`: a Ray head on 127.0.0.1 started by this task. `ray`: an existing cluster named by an
Airflow connection (nothing to start or stop). `ec2`: a head and GPU workers launched for this run,
found by their tags (so a retried setup reuses them and the teardown terminates them even when
nothing else of the run survived).
"""

from __future__ import annotations

from typing import Any

from posttrain import instance_types
from posttrain.links import RayDashboardLink
from posttrain.operators.base import PosttrainOperator
from posttrain.recipe import DEFAULT_RETRY_WINDOW_S


class RayClusterOperator(PosttrainOperator):
    """Setup task: returns the cluster's address, dashboard URL and whatever teardown needs."""

    ui_color = "#e6f4ea"
    operator_extra_links = (RayDashboardLink(),)

    def execute(self, context: Any) -> dict[str, Any]:
        from posttrain.hooks.cluster_token import ensure_token, token_uri
        from posttrain.hooks.local_ray import LocalRayCluster
        from posttrain.hooks.ray import RayJobHook

        compute = self.load_recipe().compute
        if compute.provider in ("local", "ec2"):
            # The cluster's token, in the run's storage: the tasks after this one (and their
            # triggers) may run on other machines, and a retried setup must reuse it (see
            # cluster_token). Only where the token is goes into the cluster's info.
            token = ensure_token(self.storage, self.workspace)
            where = {"token_uri": token_uri(self.workspace), "storage_conn_id": self.storage_conn_id}
        if compute.provider == "local":
            # The head's processes reach an s3:// workspace with the storage connection's
            # credentials, as an EC2 node does with its instance profile.
            info = LocalRayCluster.start(num_cpus=compute.workers * compute.cpus_per_worker + 1,
                                         timeout=compute.startup_timeout_s, node_env=self.storage.node_environment(),
                                         token=token) | where
        elif compute.provider == "ec2":
            info = self._provision_ec2(context, compute, token) | where
        else:
            hook = RayJobHook(ray_conn_id=compute.ray_conn_id)
            hook.wait_ready(compute.startup_timeout_s)
            info = {"provider": "ray", "ray_conn_id": compute.ray_conn_id, "python": "python"}
        self.storage.write_json_atomic(f"{self.workspace}/cluster.json", info)
        self.log.info("Ray cluster ready: %s", info.get("dashboard_url") or info.get("ray_conn_id"))
        RayDashboardLink.persist(context, info.get("dashboard_url"))
        return info

    def _provision_ec2(self, context: Any, compute: Any, token: str) -> dict[str, Any]:
        from posttrain.hooks.ec2 import TAG_CLUSTER, TAG_DAG, TAG_RUN, Ec2ClusterHook, cluster_id_for

        cfg = compute.ec2
        dag_id, run_id = context["ti"].dag_id, context["run_id"]
        labels = {TAG_CLUSTER: cluster_id_for(dag_id, run_id), TAG_DAG: dag_id, TAG_RUN: run_id}
        gpus_per_node = instance_types.gpus(cfg.worker_instance_type) if compute.gpus_per_worker else 0
        # Only the last try cleans up: an earlier one leaves the instances for the retry to reuse.
        return Ec2ClusterHook(cfg.aws_conn_id, cfg.region).provision_cluster(
            cfg, labels, token, gpus_per_node, self.log,
            terminate_on_failure=context["ti"].try_number > self.retries)


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
        result = self._tear_down(context)
        # The cluster is gone: its token has nothing left to open (a failed teardown keeps it, for
        # the retry that still has to reach the cluster's jobs).
        if self.workspace:
            from posttrain.hooks.cluster_token import remove_token

            remove_token(self.storage, self.workspace)
        return result

    def _tear_down(self, context: Any) -> dict[str, Any]:
        from posttrain.hooks.local_ray import LocalRayCluster

        info = self._cluster_info()
        # EC2 clusters are found from the run, with or without what the setup task left behind.
        ec2 = self._ec2_recipe() if info is None or info["provider"] == "ec2" else None
        if ec2 is not None:
            if info is not None and info.get("dashboard_url"):
                # Airflow doesn't always call the trigger's on_kill when a deferred task is marked
                # failed: stop the run's jobs first (terminating the nodes would end them too, but
                # a job may hold more than the nodes: a checkpoint half written, a tracking run).
                try:
                    self._stop_run_jobs(context, info, window_s=10.0)
                except Exception as exc:  # nodes that don't answer are terminated all the same
                    self.log.warning("could not stop this run's Ray jobs before terminating the nodes: %s", exc)
            return self._terminate_ec2(context, ec2)
        if info is None:
            self.log.info("no cluster was started for this run; nothing to tear down")
            return {"stopped": 0}
        if info["provider"] != "local":
            self.log.info("cluster %s is not ours to stop", info.get("ray_conn_id"))
            return {"stopped": 0, "jobs_stopped": self._stop_run_jobs(context, info)}
        stopped = LocalRayCluster.stop(info)
        left = LocalRayCluster.processes(info)
        if left:
            raise RuntimeError(f"{len(left)} Ray processes of cluster {info['cluster_id']} survived the teardown: "
                               + ", ".join(str(p.pid) for p in left))
        self.log.info("stopped Ray head %s (%d processes)", info["cluster_id"], stopped)
        return {"stopped": stopped, "cleaned": self._clean_node()}

    def _clean_node(self) -> list[str]:
        """What the stopped head's jobs left on this machine, which was their node: the model cache's
        entries no other run holds (the only place a job writes to a node's disk for an object-store
        workspace; for a file:// one the workspace is the run's own folder, kept)."""
        from posttrain import model_cache

        removed = model_cache.clear()
        cleaned = [f"{model_cache.cache_root()}: {len(removed)} cached models"] if removed else []
        if cleaned:
            self.log.info("removed from this node: %s", "; ".join(cleaned))
        return cleaned

    def _stop_run_jobs(self, context: Any, info: dict[str, Any], window_s: float | None = None) -> list[str]:
        """On a cluster that outlives the run, no job of the run may go on: a task ended while its
        trigger was not running yet (marked failed just after it deferred), or whose trigger was
        cancelled without on_kill, leaves a job nobody stops. The teardown stops every job
        submitted for this run."""
        from posttrain.hooks.ray import RayClusterRef

        hook = RayClusterRef.from_info(info).hook()
        # The dashboard may just be coming back from what failed the run: ask it as the jobs' tasks did.
        window = window_s if window_s is not None else (
            self.load_recipe().airflow.dashboard_retry_window_s if self._has_recipe() else DEFAULT_RETRY_WINDOW_S)
        jobs = hook.retrying(lambda: hook.running_jobs(dag_id=context["ti"].dag_id, run_id=context["run_id"]),
                             "listing this run's Ray jobs", window)
        for job_id in jobs:
            status = hook.retrying(lambda job_id=job_id: hook.stop_and_wait(job_id, timeout=120),
                                   f"stopping Ray job {job_id}", window)
            self.log.warning("stopped Ray job %s of this run (it was %s): the run is over", job_id, status)
        return jobs

    def _has_recipe(self) -> bool:
        return bool(self.workspace) and self.storage.exists(f"{self.workspace}/recipe.json")

    def _ec2_recipe(self) -> Any:
        """The recipe's EC2 settings, when this run's cluster is on EC2 (None otherwise)."""
        if not self._has_recipe():
            return None
        return self.load_recipe().compute.ec2

    def _terminate_ec2(self, context: Any, cfg: Any) -> dict[str, Any]:
        from posttrain.hooks.ec2 import Ec2ClusterHook, cluster_id_for

        # The id follows from the run: found even if the setup task died before it pushed anything.
        cluster_id = cluster_id_for(context["ti"].dag_id, context["run_id"])
        terminated = Ec2ClusterHook(cfg.aws_conn_id, cfg.region).terminate_cluster(cluster_id)
        self.log.info("cluster %s: terminated %d instances %s", cluster_id, len(terminated), terminated)
        return {"stopped": len(terminated), "cluster_id": cluster_id, "instances": terminated}
