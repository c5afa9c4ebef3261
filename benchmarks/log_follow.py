"""Following a long Ray job log with the trigger's code path: CPU and memory per poll over the
first and the last tenth of the job, and whether every line arrived once and in order.

A local Ray head (token auth, everything under POSTTRAIN_HOME) runs a job that prints `--mb`
megabytes of numbered 100-byte lines at about `--mb-per-s`; `RayJobTrigger.run()` follows it, its
log lines going (as in the triggerer) through structlog into a file, which is checked afterwards.
One "poll" is one batch of lines the trigger takes from the dashboard's log stream (at most 10
lines or ~20 kB). Prints one JSON object.

    python benchmarks/log_follow.py [--mb 200] [--mb-per-s 2.5] [--tracemalloc]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

LINE = re.compile(r"^\[ray job [^\]]+\] (\d{10}) x+$")

JOB = """\
import sys, time
total, rate = int(sys.argv[1]), float(sys.argv[2])
width, n, written, start = 100, 0, 0, time.monotonic()
while written < total:
    chunk = "".join(f"{i:010d} {'x' * (width - 12)}\\n" for i in range(n, n + 500))
    sys.stdout.write(chunk)
    n, written = n + 500, written + len(chunk)
    ahead = written / rate - (time.monotonic() - start)
    if ahead > 0:
        sys.stdout.flush()
        time.sleep(ahead)
sys.stdout.flush()
print(f"END {n}", flush=True)
"""


class Meter:
    """Per poll: process CPU time and memory, summed per tenth of the job's bytes."""

    def __init__(self, total_bytes: int, traced: bool):
        self.total, self.traced = total_bytes, traced
        self.bytes = 0
        self.tenths = [{"polls": 0, "cpu_s": 0.0, "mem_samples": 0, "rss": 0, "traced": 0} for _ in range(10)]
        self.last_cpu = time.process_time()

    def poll(self, lines: list[str]) -> None:
        self.bytes += sum(len(line) + 1 for line in lines)
        now = time.process_time()
        tenth = self.tenths[min(9, self.bytes * 10 // self.total)]
        tenth["polls"] += 1
        tenth["cpu_s"] += now - self.last_cpu
        if tenth["polls"] % 50 == 1:
            tenth["mem_samples"] += 1
            tenth["rss"] += rss_bytes()
            if self.traced:
                tenth["traced"] += tracemalloc.get_traced_memory()[0]
        self.last_cpu = time.process_time()

    def summary(self, index: int) -> dict[str, float]:
        t = self.tenths[index]
        samples = max(1, t["mem_samples"])
        out = {"cpu_s_per_poll": t["cpu_s"] / max(1, t["polls"]), "polls": t["polls"],
               "rss_mb": t["rss"] / samples / 2**20}
        if self.traced:
            out["traced_mb"] = t["traced"] / samples / 2**20
        return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def route_trigger_log(path: Path) -> Any:
    """The trigger's structlog lines into `path` as plain text (the task log, as the triggerer
    writes it)."""
    import structlog

    handle = path.open("w", buffering=1 << 20)
    structlog.configure(processors=[structlog.stdlib.PositionalArgumentsFormatter(),
                                    lambda _logger, _name, event: event["event"]],
                        logger_factory=structlog.WriteLoggerFactory(file=handle), cache_logger_on_first_use=True)
    return handle


def check_log(path: Path) -> tuple[int, bool, int | None]:
    """(numbered lines, all once and in order, the count the job said it printed)."""
    expected, in_order, said = 0, True, None
    with path.open() as f:
        for line in f:
            if match := LINE.match(line.rstrip("\n")):
                in_order &= int(match.group(1)) == expected
                expected += 1
            elif " END " in line:
                said = int(line.rsplit(" ", 1)[1])
    return expected, in_order and said == expected, said


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=200.0, help="megabytes the job prints")
    parser.add_argument("--mb-per-s", type=float, default=2.5, help="how fast the job prints")
    parser.add_argument("--tracemalloc", action="store_true", help="also trace Python allocations (slower)")
    args = parser.parse_args(argv)

    from posttrain.hooks.local_ray import LocalRayCluster
    from posttrain.paths import posttrain_home
    from posttrain.triggers.ray import RayJobTrigger

    work = posttrain_home() / "bench" / "log_follow"
    work.mkdir(parents=True, exist_ok=True)
    (work / "job.py").write_text(JOB)
    task_log = work / "task.log"
    total = int(args.mb * 1e6)
    meter = Meter(total, args.tracemalloc)

    class MeteredTrigger(RayJobTrigger):
        def log_lines(self, lines: list[str]) -> None:
            super().log_lines(lines)
            meter.poll(lines)

    info = LocalRayCluster.start(num_cpus=1)
    handle = route_trigger_log(task_log)
    try:
        from posttrain.hooks.ray import RayJobHook

        hook = RayJobHook(address=info["dashboard_url"], token_file=info["token_file"])
        job_id = hook.submit_job(f"{info['python']} {work / 'job.py'} {total} {args.mb_per_s * 1e6}",
                                 "log-follow-bench", entrypoint_num_cpus=0)
        trigger = MeteredTrigger(job_id=job_id, address=info["dashboard_url"], token_file=info["token_file"])
        if args.tracemalloc:
            tracemalloc.start()
        started, cpu0 = time.monotonic(), time.process_time()

        async def first_event() -> dict[str, Any]:
            async for event in trigger.run():
                return event.payload
            raise RuntimeError("the trigger ended without an event")

        event = asyncio.run(first_event())
        wall, cpu = time.monotonic() - started, time.process_time() - cpu0
    finally:
        handle.close()
        LocalRayCluster.stop(info)
    lines, once_in_order, said = check_log(task_log)
    first, last = meter.summary(0), meter.summary(9)
    result = {
        "status": event["status"], "mb": args.mb, "mb_per_s_target": args.mb_per_s,
        "bytes": meter.bytes, "total_lines": lines, "lines_printed_by_job": said,
        "lines_received_once_in_order": once_in_order,
        "wall_s": round(wall, 1), "follower_cpu_s": round(cpu, 2),
        "first_tenth": first, "last_tenth": last,
        "cpu_s_per_poll_last_over_first": last["cpu_s_per_poll"] / max(first["cpu_s_per_poll"], 1e-12),
        "rss_last_over_first": last["rss_mb"] / max(first["rss_mb"], 1e-12),
    }
    if args.tracemalloc:
        result["traced_last_over_first"] = last["traced_mb"] / max(first["traced_mb"], 1e-12)
    task_log.unlink(missing_ok=True)
    return result


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    print(json.dumps(main(sys.argv[1:])))
