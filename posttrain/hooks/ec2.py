"""The EC2 side of a per-run Ray cluster: launch the head, then the workers; find them again by
their tags; terminate them all.

Every instance carries the cluster id, the DAG id and the run id as tags. The cluster id is a hash
of (dag id, run id), so a retried setup task, the teardown task and `posttrain gc` all find the
same instances without any state of their own: nothing the run wrote has to survive for its
instances to be found and terminated.

Built on the amazon provider's EC2Hook (connection, region, endpoint from `aws_conn_id`).
"""

from __future__ import annotations

import hashlib
import re
import shlex
import time
from typing import Any

from posttrain.ec2_config import Ec2Config

TAG_CLUSTER, TAG_DAG, TAG_RUN, TAG_ROLE = ("posttrain:cluster-id", "posttrain:dag-id", "posttrain:run-id",
                                           "posttrain:role")
LIVE_STATES = ("pending", "running", "stopping", "stopped")
GONE_STATES = ("shutting-down", "terminated")
ALL_STATES = LIVE_STATES + GONE_STATES
# What EC2 answers when spot (or any) capacity isn't there: workers then fall back to on-demand.
CAPACITY_ERRORS = {"InsufficientInstanceCapacity", "SpotMaxPriceTooLow", "MaxSpotInstanceCountExceeded",
                   "InsufficientCapacity", "UnfulfillableCapacity", "InsufficientFreeAddressesInSubnet"}


class Ec2ClusterError(RuntimeError):
    pass


def cluster_id_for(dag_id: str, run_id: str) -> str:
    return "ptc-" + hashlib.sha256(f"{dag_id}\n{run_id}".encode()).hexdigest()[:16]


def tag(instance: dict, key: str) -> str | None:
    return next((t["Value"] for t in instance.get("Tags", []) if t["Key"] == key), None)


def user_data(cfg: Ec2Config, role: str, cluster_id: str, token: str, head_ip: str | None = None,
              gpus: int = 0) -> str:
    """Boot script: run the image's Ray, head or worker; nothing is installed at boot. Ray's token
    authentication keeps the cluster's API closed to anyone without the run's token."""
    ray = (f"ray start --head --port={cfg.ray_port} --dashboard-host=0.0.0.0 --dashboard-port=8265"
           if role == "head" else f"ray start --address={head_ip}:{cfg.ray_port}")
    gpu_flags = "--gpus all " if gpus else ""
    registry = cfg.image.split("/", 1)[0]
    ecr = re.fullmatch(r"\d{12}\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com", registry)
    login = ([f"aws ecr get-login-password --region {ecr.group(1)} | docker login --username AWS "
              f"--password-stdin {registry}"] if ecr else [])  # the instance profile needs ECR read access
    return "\n".join([
        "#!/bin/bash",
        "set -euo pipefail",
        f"# posttrain Ray cluster {cluster_id}: {role}",
        *login,
        f"docker run -d --name posttrain-ray --restart on-failure:3 --network host --shm-size=16g {gpu_flags}"
        f"-e RAY_AUTH_MODE=token -e RAY_AUTH_TOKEN={shlex.quote(token)} {shlex.quote(cfg.image)} "
        f"{ray} --num-gpus={gpus} --block --disable-usage-stats",
        "",
    ])


class Ec2ClusterHook:
    def __init__(self, aws_conn_id: str, region: str):
        from airflow.providers.amazon.aws.hooks.ec2 import EC2Hook

        self.aws_conn_id, self.region = aws_conn_id, region
        self.client: Any = EC2Hook(aws_conn_id=aws_conn_id, region_name=region, api_type="client_type").conn

    # --- finding -------------------------------------------------------------------------------
    def instances(self, cluster_id: str | None = None, states: tuple[str, ...] = LIVE_STATES) -> list[dict]:
        """Instances of one cluster (or of every posttrain cluster) in the given states."""
        filters = [{"Name": "instance-state-name", "Values": list(states)}]
        filters.append({"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster_id]} if cluster_id
                       else {"Name": "tag-key", "Values": [TAG_CLUSTER]})
        return self._describe(Filters=filters)

    def _describe(self, **kwargs: Any) -> list[dict]:
        pages = self.client.get_paginator("describe_instances").paginate(**kwargs)
        return [i for page in pages for reservation in page["Reservations"] for i in reservation["Instances"]]

    # --- launching -----------------------------------------------------------------------------
    def resolve_ami(self, cfg: Ec2Config) -> str:
        if cfg.ami:
            return cfg.ami
        from airflow.providers.amazon.aws.hooks.ssm import SsmHook

        return SsmHook(aws_conn_id=self.aws_conn_id, region_name=self.region).get_parameter_value(
            cfg.ami_ssm_parameter)

    def launch_params(self, cfg: Ec2Config, ami: str, role: str, count: int, labels: dict[str, str],
                      script: str, spot: bool) -> dict[str, Any]:
        root = self.client.describe_images(ImageIds=[ami])["Images"][0].get("RootDeviceName", "/dev/xvda")
        tags = [{"Key": k, "Value": v} for k, v in {**cfg.tags, **labels, TAG_ROLE: role,
                                                    "Name": f"{labels[TAG_CLUSTER]}-{role}"}.items()]
        profile = cfg.iam_instance_profile
        params: dict[str, Any] = {
            "ImageId": ami, "MinCount": count, "MaxCount": count, "UserData": script,
            "InstanceType": cfg.head_instance_type if role == "head" else cfg.worker_instance_type,
            "IamInstanceProfile": {"Arn": profile} if profile.startswith("arn:") else {"Name": profile},
            # IMDSv2 only; hop limit 2 so the container on the node reaches the metadata service.
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 2},
            "BlockDeviceMappings": [{"DeviceName": root, "Ebs": {
                "VolumeSize": cfg.root_volume_gib, "VolumeType": "gp3", "Encrypted": True,
                "DeleteOnTermination": True}}],
            "NetworkInterfaces": [{"DeviceIndex": 0, "SubnetId": cfg.subnet_id, "Groups": cfg.security_group_ids,
                                   "AssociatePublicIpAddress": cfg.public_ip, "DeleteOnTermination": True}],
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tags},
                                  {"ResourceType": "volume", "Tags": tags}],
            # A node that shuts itself down is gone for good, not a stopped instance to forget.
            "InstanceInitiatedShutdownBehavior": "terminate",
        }
        if cfg.key_name:
            params["KeyName"] = cfg.key_name
        if spot:
            params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
                "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
        return params

    def launch(self, params: dict[str, Any]) -> list[str]:
        return [i["InstanceId"] for i in self.client.run_instances(**params)["Instances"]]

    def launch_workers(self, cfg: Ec2Config, ami: str, count: int, labels: dict[str, str], script: str,
                       log: Any) -> list[str]:
        """Spot when the recipe asks, on-demand when spot has no capacity (or on-demand only)."""
        from botocore.exceptions import ClientError

        if cfg.spot_workers:
            try:
                return self.launch(self.launch_params(cfg, ami, "worker", count, labels, script, spot=True))
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code not in CAPACITY_ERRORS:
                    raise
                log.warning("no spot capacity for %d × %s (%s); launching on-demand", count,
                            cfg.worker_instance_type, code)
        return self.launch(self.launch_params(cfg, ami, "worker", count, labels, script, spot=False))

    # --- waiting and terminating -----------------------------------------------------------------
    def wait_running(self, ids: list[str], deadline: float, poll: float = 2.0) -> list[dict]:
        while True:
            found = self._describe(InstanceIds=ids)
            states = {i["InstanceId"]: i["State"]["Name"] for i in found}
            dead = [i for i, s in states.items() if s in GONE_STATES + ("stopping", "stopped")]
            if dead:
                raise Ec2ClusterError(f"instances {dead} stopped or terminated while starting")
            if len(states) == len(ids) and all(s == "running" for s in states.values()):
                return found
            if time.monotonic() > deadline:
                raise Ec2ClusterError(f"instances not running in time: {states}")
            time.sleep(poll)

    def terminate_cluster(self, cluster_id: str, timeout: float = 300, poll: float = 2.0) -> list[str]:
        """Terminate every live instance tagged with the cluster id; return once all are
        shutting down or terminated (raises if that takes longer than `timeout`)."""
        ids = [i["InstanceId"] for i in self.instances(cluster_id)]
        if not ids:
            return []
        self.client.terminate_instances(InstanceIds=ids)
        deadline = time.monotonic() + timeout
        while left := self.instances(cluster_id):
            if time.monotonic() > deadline:
                raise Ec2ClusterError(f"cluster {cluster_id}: {[i['InstanceId'] for i in left]} still not "
                                      f"terminating after {timeout:.0f} s")
            self.client.terminate_instances(InstanceIds=[i["InstanceId"] for i in left])
            time.sleep(poll)
        return ids

    # --- the whole cluster ------------------------------------------------------------------------
    def provision(self, cfg: Ec2Config, labels: dict[str, str], token: str, gpus_per_node: int, deadline: float,
                  log: Any) -> dict[str, Any]:
        """Head first (workers need its address), then the workers that are missing: instances
        from an earlier try of the same run are reused, never launched twice."""
        cluster_id = labels[TAG_CLUSTER]
        live = self.instances(cluster_id)
        heads = [i["InstanceId"] for i in live if tag(i, TAG_ROLE) == "head"]
        workers = [i["InstanceId"] for i in live if tag(i, TAG_ROLE) == "worker"]
        if live:
            log.info("cluster %s from an earlier try: %d head, %d workers", cluster_id, len(heads), len(workers))
        ami = self.resolve_ami(cfg)
        if not heads:
            script = user_data(cfg, "head", cluster_id, token)
            heads = self.launch(self.launch_params(cfg, ami, "head", 1, labels, script, spot=False))
            log.info("cluster %s: launched head %s (%s)", cluster_id, heads[0], cfg.head_instance_type)
        (head,) = self.wait_running(heads[:1], deadline)
        ip = head.get("PrivateIpAddress", "")
        missing = cfg.worker_nodes - len(workers)
        if missing > 0:
            script = user_data(cfg, "worker", cluster_id, token, head_ip=ip, gpus=gpus_per_node)
            new = self.launch_workers(cfg, ami, missing, labels, script, log)
            log.info("cluster %s: launched %d workers (%s) %s", cluster_id, len(new), cfg.worker_instance_type, new)
            workers += new
        self.wait_running(workers, deadline)
        return {
            "provider": "ec2", "cluster_id": cluster_id, "region": self.region, "aws_conn_id": self.aws_conn_id,
            "head_instance_id": head["InstanceId"], "worker_instance_ids": workers,
            "address": f"{ip}:{cfg.ray_port}", "nodes": 1 + cfg.worker_nodes, "python": "python",
            "dashboard_url": cfg.dashboard_url.format(private_ip=ip, public_ip=head.get("PublicIpAddress", "")),
        }

    def provision_cluster(self, cfg: Ec2Config, labels: dict[str, str], token: str, gpus_per_node: int,
                          log: Any, terminate_on_failure: bool) -> dict[str, Any]:
        """`provision`, then wait for Ray on every node: all of it within `cfg.launch_timeout_s`.
        The nodes' Ray starts with `token`, and the hook that waits for them uses it too (where
        the later tasks find it is the caller's: the run's workspace). On failure the cluster is
        terminated when `terminate_on_failure` (a setup's last try: Airflow skips the teardown of a
        failed setup), else left for the next try to reuse."""
        from posttrain.hooks.ray import RayJobHook

        cluster_id = labels[TAG_CLUSTER]
        deadline = time.monotonic() + cfg.launch_timeout_s
        try:
            info = self.provision(cfg, labels, token, gpus_per_node, deadline, log)
            # Running instances are not a cluster yet: wait for Ray on every node (never forever).
            RayJobHook(address=info["dashboard_url"], token=token).wait_nodes(
                info["nodes"], max(1.0, deadline - time.monotonic()))
        except BaseException:
            if terminate_on_failure:
                log.error("setup failed on its last try: terminating cluster %s", cluster_id)
                self.terminate_cluster(cluster_id)
            raise
        return info
