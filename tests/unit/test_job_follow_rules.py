"""The rules of following a Ray job, without a cluster: when a cancelled trigger stops its job,
which dashboard errors are retried and for how long, and how the log stream becomes lines."""

from __future__ import annotations

import time

import httpx
import pytest
from airflow.utils.state import TaskInstanceState

from posttrain.hooks.ray_follow import MAX_PARTIAL_CHARS, Backoff, LogFollower, RayJobError, is_transient
from posttrain.triggers.ray import should_stop_job_on_kill


@pytest.mark.parametrize("state", ["deferred", TaskInstanceState.DEFERRED, "TaskInstanceState.DEFERRED"])
def test_a_task_still_deferred_keeps_its_job(state) -> None:
    stop, why = should_stop_job_on_kill(state)
    assert not stop and "another triggerer" in why


@pytest.mark.parametrize("state", [None, "failed", "success", "up_for_retry", "scheduled", "queued", "running",
                                   "restarting", "removed", TaskInstanceState.FAILED])
def test_a_task_ended_from_outside_stops_its_job(state) -> None:
    stop, why = should_stop_job_on_kill(state)
    assert stop and "no longer deferred" in why


def test_an_unreadable_task_state_stops_the_job() -> None:
    stop, why = should_stop_job_on_kill(None, read_error="ConnectError: refused")
    assert stop and "could not be read" in why


@pytest.mark.parametrize(("exc", "transient"), [
    (httpx.ConnectError("refused"), True),
    (httpx.ReadTimeout("slow"), True),
    (ConnectionResetError("reset"), True),
    (RayJobError("HTTP 503", 503), True),
    (RayJobError("HTTP 500", 500), True),
    (RayJobError("HTTP 429", 429), True),
    (RayJobError("HTTP 401", 401), False),
    (RayJobError("HTTP 403", 403), False),
    (RayJobError("HTTP 404", 404), False),
    (ValueError("bad json"), False),
])
def test_which_errors_are_transient(exc: BaseException, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_backoff_grows_then_gives_up_after_its_window() -> None:
    backoff = Backoff(window_s=0.3, first_s=0.05, cap_s=1.0)
    delays = [backoff.delay(httpx.ConnectError("refused"), "x") for _ in range(3)]
    assert delays == [0.05, 0.1, 0.2]
    time.sleep(0.31)
    with pytest.raises(RayJobError, match="kept failing for 0s"):
        backoff.delay(httpx.ConnectError("refused"), "x")
    backoff.reset()
    assert backoff.delay(httpx.ConnectError("refused"), "x") == 0.05


def test_backoff_raises_errors_that_are_not_transient_at_once() -> None:
    with pytest.raises(RayJobError, match="401"):
        Backoff(window_s=60).delay(RayJobError("HTTP 401", 401), "x")


def test_messages_become_lines_across_message_boundaries() -> None:
    follower = LogFollower("http://127.0.0.1:1", {}, "j")
    assert follower._take("a\nb") == ["a"]
    assert follower._take("c\r\nd\n") == ["bc", "d"]
    assert follower._take("") == [] and follower.finish() == []
    assert follower._take("tail without newline") == [] and follower.finish() == ["tail without newline"]
    assert follower.received == len("a\nbc\r\nd\ntail without newline")
    assert list(follower.tail) == ["a", "bc", "d", "tail without newline"]


def test_an_endless_line_is_handed_on_in_pieces() -> None:
    follower = LogFollower("http://127.0.0.1:1", {}, "j")
    pieces = [piece for _ in range(10) for piece in follower._take("z" * 20_000)]
    assert all(len(p) <= MAX_PARTIAL_CHARS + 20_000 for p in pieces) and len(follower.partial) <= MAX_PARTIAL_CHARS
    assert sum(map(len, pieces)) + len(follower.partial) == 200_000
    for _ in range(1000):
        follower._take("line\n")
    assert len(follower.tail) == 40 and follower.retained_chars() == 40 * 4
