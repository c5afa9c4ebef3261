"""Following Ray jobs on a real local head: the log streamed incrementally (every line once, in
order, with bounded state), a dashboard that fails for a while (real sockets: a closed port, then a
relay answering 503 before it forwards), errors that are not worth retrying, and jobs that must
not outlive their try."""

from __future__ import annotations

import asyncio
import shlex
import time
from types import SimpleNamespace
from typing import Any

import pytest

from posttrain.hooks.ray import TERMINAL_STATES, RayJobHook
from posttrain.hooks.ray_follow import MAX_PARTIAL_CHARS, LogFollower
from posttrain.operators.ray_job import RayJobFailed
from posttrain.operators.train import TrainOperator
from posttrain.triggers.ray import RayJobTrigger
from tests.conftest import free_port

SLEEPER = "import time; print('started', flush=True); time.sleep(600)"


@pytest.fixture(scope="module")
def cluster(ray_cluster: dict) -> dict:
    return ray_cluster


def hook_of(cluster: dict[str, Any]) -> RayJobHook:
    return RayJobHook(address=cluster["dashboard_url"], token_file=cluster["token_file"])


def submit(cluster: dict[str, Any], script: str, job_id: str) -> str:
    return hook_of(cluster).submit_job(f"{cluster['python']} -c {shlex.quote(script)}", job_id,
                                       entrypoint_num_cpus=0)


def first_event(trigger: RayJobTrigger, timeout: float = 180) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    return asyncio.run(asyncio.wait_for(run(), timeout))


def wait_terminal(hook: RayJobHook, job_id: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while (status := hook.get_job(job_id)["status"]) not in TERMINAL_STATES:
        assert time.monotonic() < deadline, f"{job_id} still {status}"
        time.sleep(0.5)
    return status


def test_a_long_log_arrives_once_in_order_with_bounded_state(cluster: dict[str, Any]) -> None:
    """40,000 numbered lines written in bursts, a line written piece by piece that grows longer
    than the follower keeps unfinished (handed on in pieces), and a last line with no newline:
    each arrives once, in order, while the follower holds only the unfinished line and the last
    40 lines."""
    script = ("import sys, time\n"
              "for burst in range(8):\n"
              "    sys.stdout.write(''.join(f'line {i:06d} ' + 'y' * 60 + chr(10) "
              "for i in range(burst * 5000, burst * 5000 + 5000)))\n"
              "    sys.stdout.flush(); time.sleep(0.2)\n"
              "time.sleep(3)\n"  # the follower catches up: it sees the long line as it is written
              "for piece in range(10):\n"
              f"    sys.stdout.write('L' * {MAX_PARTIAL_CHARS // 3}); sys.stdout.flush(); time.sleep(0.4)\n"
              "sys.stdout.write(chr(10) + 'the end, no newline')\n")
    job_id = submit(cluster, script, "follow-long")
    hook = hook_of(cluster)
    base, headers = hook._endpoint()
    follower = LogFollower(base, headers, job_id)
    seen: list[int] = []
    long_pieces: list[int] = []
    last: list[str] = []
    retained = 0

    def on_lines(lines: list[str]) -> None:
        nonlocal retained
        retained = max(retained, follower.retained_chars())
        for line in lines:
            if line.startswith("line "):
                seen.append(int(line.split()[1]))
            elif line.startswith("L"):
                long_pieces.append(len(line))
            else:
                last.append(line)

    outcome = asyncio.run(hook.follow_job(job_id, on_lines, poll_interval=0.5, follower=follower))
    assert outcome["status"] == "SUCCEEDED"
    assert seen == list(range(40_000))
    assert sum(long_pieces) == 10 * (MAX_PARTIAL_CHARS // 3) and len(long_pieces) > 1
    assert last[-1] == "the end, no newline" and outcome["log_tail"].endswith("the end, no newline")
    # What the follower holds: at most the unfinished line cap plus 40 tail lines (of 2,000 chars).
    assert retained <= MAX_PARTIAL_CHARS + 40 * 2_000


def test_the_blocking_wait_uses_the_same_follower(cluster: dict[str, Any]) -> None:
    job_id = submit(cluster, "[print(f'tick {i}', flush=True) for i in range(500)]", "follow-blocking")
    lines: list[str] = []
    outcome = hook_of(cluster).wait_for_job(job_id, timeout=120, on_log=lines.append, poll_interval=0.5)
    assert outcome["status"] == "SUCCEEDED"
    assert [line for line in lines if line.startswith("tick ")] == [f"tick {i}" for i in range(500)]


async def relay(port: int, target_port: int, refuse_first: int) -> tuple[asyncio.Server, list[int]]:
    """A TCP relay on `port` that answers the first `refuse_first` connections with HTTP 503 and
    forwards the others, byte for byte, to the dashboard (websocket upgrades included)."""
    served = [0]

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served[0] += 1
        if served[0] <= refuse_first:
            await reader.read(65536)
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\nconnection: close\r\n\r\nbusy")
            await writer.drain()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    return await asyncio.start_server(handle, "127.0.0.1", port), served


def test_transient_errors_are_retried_until_the_dashboard_answers(cluster: dict[str, Any]) -> None:
    """Connection refused for ~2 s (nothing listens on the port yet), then three 503s, then the
    real dashboard: the trigger rides it out and reports the job's outcome with its whole log."""
    job_id = submit(cluster, "import time; [(print(f'n {i}', flush=True), time.sleep(0.05)) for i in range(60)]",
                    "follow-transient")
    port, dashboard_port = free_port(), int(cluster["dashboard_url"].rsplit(":", 1)[1])
    trigger = RayJobTrigger(job_id=job_id, address=f"http://127.0.0.1:{port}", token_file=cluster["token_file"],
                            poll_interval=0.5, retry_window_s=60)
    lines: list[str] = []
    trigger.log_lines = lines.extend  # type: ignore[method-assign]  # collect instead of logging

    async def scenario() -> tuple[dict[str, Any], int]:
        follow = asyncio.create_task(anext(trigger.run()))
        await asyncio.sleep(2.0)
        assert not follow.done()  # still retrying the refused connection
        server, served = await relay(port, dashboard_port, refuse_first=3)
        try:
            event = await asyncio.wait_for(follow, 120)
        finally:
            server.close()
        return event.payload, served[0]

    event, connections = asyncio.run(scenario())
    assert event["status"] == "SUCCEEDED", event
    assert connections > 3
    assert [line for line in lines if line.startswith("n ")] == [f"n {i}" for i in range(60)]


def test_a_dashboard_that_stays_down_fails_after_the_retry_window(cluster: dict[str, Any]) -> None:
    started = time.monotonic()
    event = first_event(RayJobTrigger(job_id="nothing-here", address=f"http://127.0.0.1:{free_port()}",
                                      poll_interval=0.2, retry_window_s=3))
    assert event["status"] == "ERROR" and "kept failing for 3s" in event["message"], event
    assert time.monotonic() - started >= 3


@pytest.mark.parametrize("case", ["no token (401)", "unknown job (404)"])
def test_errors_that_are_not_transient_fail_at_once(cluster: dict[str, Any], case: str) -> None:
    job_id = submit(cluster, "print('hi')", f"follow-refused-{case[:2]}") if "401" in case else "no-such-job"
    token = None if "401" in case else cluster["token_file"]
    started = time.monotonic()
    event = first_event(RayJobTrigger(job_id=job_id, address=cluster["dashboard_url"], token_file=token,
                                      poll_interval=0.2, retry_window_s=120))
    assert event["status"] == "ERROR"
    assert case[-4:-1] in event["message"], event
    assert time.monotonic() - started < 30  # not the 120 s retry window


def operator(cluster: dict[str, Any], **kwargs: Any) -> TrainOperator:
    return TrainOperator(task_id="train", workspace="file:///unused", cluster=cluster, stop_timeout_s=60, **kwargs)


def test_earlier_tries_are_stopped_before_a_new_try(cluster: dict[str, Any]) -> None:
    op = operator(cluster)
    ti = SimpleNamespace(dag_id="d", run_id="manual__1", task_id="train", try_number=3)
    hook = hook_of(cluster)
    first, second = op.job_id_of(ti, 1), op.job_id_of(ti, 2)
    submit(cluster, "print('done')", first)
    wait_terminal(hook, first)
    submit(cluster, SLEEPER, second)
    op.stop_earlier_tries(ti)
    assert hook.get_job(first)["status"] == "SUCCEEDED"  # over already: left as it was
    assert hook.get_job(second)["status"] == "STOPPED"  # stopped, and waited for


def test_a_trigger_error_stops_the_job(cluster: dict[str, Any]) -> None:
    hook = hook_of(cluster)
    job_id = submit(cluster, SLEEPER, "follow-error-stops")
    with pytest.raises(RayJobFailed, match="dashboard kept failing"):
        operator(cluster).execute_complete({}, {"status": "ERROR", "job_id": job_id, "log_tail": "",
                                                "message": "the Ray dashboard kept failing for 300s"})
    assert wait_terminal(hook, job_id) == "STOPPED"


def test_on_kill_stops_the_job_unless_the_task_is_still_deferred(cluster: dict[str, Any], monkeypatch) -> None:
    hook = hook_of(cluster)
    job_id = submit(cluster, SLEEPER, "follow-on-kill")
    trigger = RayJobTrigger(job_id=job_id, address=cluster["dashboard_url"], token_file=cluster["token_file"])

    async def deferred() -> str:
        return "deferred"

    monkeypatch.setattr(trigger, "task_state", deferred)  # the trigger moved to another triggerer
    asyncio.run(trigger.on_kill())
    time.sleep(1)
    assert hook.get_job(job_id)["status"] not in TERMINAL_STATES
    monkeypatch.undo()  # outside a triggerer the state can't be read: stop, to be safe
    asyncio.run(trigger.on_kill())
    assert wait_terminal(hook, job_id) == "STOPPED"
