"""A Ray cluster of several nodes on 127.0.0.1, for tests that need a cluster the size of an EC2 one.

`ray start --address=127.0.0.1:…` for a second node rewrites the loopback address to the machine's
network address (and refuses outright where multi-node clusters are switched off), so the nodes
come from Ray's own test utility, `ray.cluster_utils.Cluster`: one head and N-1 raylets in this
process tree, every one registered as 127.0.0.1. RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps the
processes that connect later (the job agent, job drivers) on 127.0.0.1 too: without it Ray turns
"127.0.0.1" into the machine's address, where nothing listens.

Run as `RAY_TMPDIR=… python -m tests.multinode_ray NODES DASHBOARD_PORT GCS_PORT READY_FILE AGENT_PORT…`
(one dashboard agent port per node): it writes {"address",
"dashboard_url"} to READY_FILE once every node is up, then holds the cluster until its stdin
closes or it gets SIGTERM, and on the way out stops every process it started (the dashboard's
module subprocesses included, which `Cluster.shutdown` leaves behind).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path


def main() -> int:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import psutil
    from ray.cluster_utils import Cluster

    nodes, dashboard_port, gcs_port, ready = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    agent_ports = [int(port) for port in sys.argv[5:5 + nodes]]
    # Sessions straight under RAY_TMPDIR (Ray would add "/ray"): its caller sized that path so
    # Ray's socket paths fit (posttrain.paths.ray_temp_dir).
    temp_dir = os.environ["RAY_TMPDIR"]
    Path(temp_dir, "ray").mkdir(parents=True, exist_ok=True)  # Ray still writes its address file there
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    # Every process of this cluster (job drivers, Ray Train's actors) connects to this cluster:
    # "auto" would find every cluster on the machine, and may pick another.
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{gcs_port}"
    # Every node's dashboard agent gets a free port of its own: Ray's default (52365) is one port
    # for the whole machine, so a second cluster's head agent (another test's, on another xdist
    # worker) would come up without its HTTP server, and every job submission to it would fail
    # "No available agent to submit job".
    cluster = Cluster(initialize_head=True, head_node_args={"gcs_server_port": gcs_port,
        "num_cpus": 2, "num_gpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": True, "temp_dir": temp_dir,
        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port, "dashboard_agent_listen_port": agent_ports[0]})
    # A job's supervisor finds its cluster from the address file in the session's temp dir, which
    # `Cluster` writes elsewhere (under RAY_TMPDIR/ray): without this a job driver would connect
    # to whichever cluster on the machine it finds first.
    Path(temp_dir, "ray_current_cluster").write_text(cluster.address)
    try:
        for port in agent_ports[1:]:
            cluster.add_node(num_cpus=1, num_gpus=0, node_ip_address="127.0.0.1", temp_dir=temp_dir,
                             dashboard_agent_listen_port=port)
        cluster.wait_for_nodes(timeout=90)
        ready.write_text(json.dumps({"address": cluster.address, "dashboard_url": f"http://127.0.0.1:{dashboard_port}"}))
        stop.wait()
    finally:
        started = psutil.Process().children(recursive=True)
        cluster.shutdown()
        for proc in started:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(started, timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
