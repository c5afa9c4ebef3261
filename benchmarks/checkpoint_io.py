"""Checkpoint save/load throughput: a local disk vs an S3 server (moto's, on loopback), same run.

One process, a one-rank gloo group, a stack of float32 Linear layers (default 32M parameters) with
AdamW state after one step, so a checkpoint holds the weights and both moments (~3 x 4 bytes per
parameter). Each arm saves and loads through `posttrain.training_lib.checkpoint` exactly as a
training job does (DCP through fsspec, per-rank state, the commit marker written last, pruning to
one kept checkpoint), `--repeats` times; throughput is the checkpoint's bytes (the sizes its
commit.json lists) over the wall time of the call, and the median is reported.

What the numbers mean: the local arm writes with fsync to this machine's disk; the S3 arm goes
through s3fs/aiobotocore over HTTP to moto's in-memory server on 127.0.0.1, so it measures the
client path (multipart upload, request overhead, one stream per rank) without a network or real
S3's limits. Both run on the same busy 2-core machine: compare them with each other, not with a
GPU node's numbers.

Prints one JSON object: {"params", "checkpoint_mb", "repeats", "local_save_mb_per_s",
"local_load_mb_per_s", "s3_save_mb_per_s", "s3_load_mb_per_s", "s3_vs_local_save",
"s3_vs_local_load", ...}; MiB throughout. Everything it writes is under
$POSTTRAIN_HOME/bench/checkpoint_io (default <repo>/.posttrain) and in the moto server's memory,
both removed at the end; the server is stopped by its pid.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

MB = 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)


def _model(params_m: int):  # noqa: ANN202 - torch is imported inside
    import torch

    torch.manual_seed(0)
    width = 2048
    layers = max(1, round(params_m * 1e6 / (width * width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(4, width)).sum().backward()
    optimizer.step()
    return model, optimizer


def _arm(root: str, model, optimizer, repeats: int) -> dict:  # noqa: ANN001
    from posttrain.storage_fs import Store
    from posttrain.training_lib import checkpoint

    ckpts, saves, loads, size = Store.at(root) / "checkpoints", [], [], 0
    for step in range(1, repeats + 1):
        start = time.perf_counter()
        path = checkpoint.save(ckpts, step, model, optimizer, {"step": step}, rank=0, keep=1)
        saves.append(time.perf_counter() - start)
        size = sum((path / checkpoint.COMMIT).read_json()["files"].values())
        start = time.perf_counter()
        checkpoint.load(path, model, optimizer, rank=0)
        loads.append(time.perf_counter() - start)
    return {"checkpoint_mb": size / MB, "save_s": statistics.median(saves), "load_s": statistics.median(loads)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params-m", type=int, default=32, help="millions of parameters (float32)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import boto3
    import torch
    import torch.distributed as dist

    from posttrain.paths import posttrain_home

    work = posttrain_home() / "bench" / "checkpoint_io"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    proc, endpoint = _start_moto()
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "MASTER_ADDR": "127.0.0.1"})
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        model, optimizer = _model(args.params_m)
        local = _arm(str(work / "local"), model, optimizer, args.repeats)
        s3 = _arm(f"s3://{bucket}/run", model, optimizer, args.repeats)
    finally:
        dist.destroy_process_group()
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    mb = local["checkpoint_mb"]
    result = {
        "params": sum(p.numel() for p in model.parameters()),
        "checkpoint_mb": round(mb, 1),
        "repeats": args.repeats,
        "local_save_mb_per_s": round(mb / local["save_s"], 1),
        "local_load_mb_per_s": round(mb / local["load_s"], 1),
        "s3_save_mb_per_s": round(s3["checkpoint_mb"] / s3["save_s"], 1),
        "s3_load_mb_per_s": round(s3["checkpoint_mb"] / s3["load_s"], 1),
        "local_save_s": round(local["save_s"], 3), "local_load_s": round(local["load_s"], 3),
        "s3_save_s": round(s3["save_s"], 3), "s3_load_s": round(s3["load_s"], 3),
        "s3_server": "moto (in-memory, 127.0.0.1)",
        "torch": torch.__version__,
    }
    result["s3_vs_local_save"] = round(result["s3_save_mb_per_s"] / result["local_save_mb_per_s"], 3)
    result["s3_vs_local_load"] = round(result["s3_load_mb_per_s"] / result["local_load_mb_per_s"], 3)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
