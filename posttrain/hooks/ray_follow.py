"""Following one Ray job through its dashboard: the log as a stream, the status, and the dashboard's
failure modes told apart (transient ones are retried with backoff for a bounded time).

The log comes from the Jobs API's websocket `GET /api/jobs/{id}/logs/tail` (what Ray's own
`JobSubmissionClient.tail_job_logs` uses). The dashboard sends the driver log from its first byte
in messages of at most 10 lines or about 20,000 characters and closes the socket normally once the
job is terminal and every byte is sent, so each poll costs the same at any log length and nothing
here holds more than one message, one unfinished line and the last lines for the failure message.
The stream has no offset parameter: after a dropped connection the follower reconnects and skips
the characters it already handed on (the skipped part is read again, once per reconnect).
The plain-HTTP calls (status, stop) and the websocket both carry the cluster's bearer token.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from posttrain.recipe import DEFAULT_RETRY_WINDOW_S

TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")
LOG_TAIL_LINES = 40
TAIL_LINE_CHARS = 2_000  # a tail line is cut to this (the tail is for a failure message)
MAX_PARTIAL_CHARS = 64 * 1024  # an unfinished line longer than this is handed on in pieces
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the dashboard's messages are ~20 kB; a bigger one is refused
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


def transient_status(code: int) -> bool:
    """An HTTP status worth asking again after (5xx, 429, 408, 425)."""
    return code in TRANSIENT_HTTP or code >= 500


class RayJobError(RuntimeError):
    """A failed call to the dashboard. `transient`: worth retrying (see transient_status)."""

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.transient = status_code is not None and transient_status(status_code)


class RayJobTimeout(RayJobError):
    pass


def is_transient(exc: BaseException) -> bool:
    """Connection refused/reset, timeouts, 5xx: the dashboard may answer again. 401/403/404 and
    malformed answers won't get better by asking again."""
    from websockets.exceptions import ConnectionClosedError, InvalidHandshake, InvalidStatus

    if isinstance(exc, RayJobError):
        return exc.transient
    if isinstance(exc, InvalidStatus):
        return transient_status(exc.response.status_code)
    return isinstance(exc, httpx.TransportError | ConnectionClosedError | InvalidHandshake | OSError
                      | TimeoutError | asyncio.TimeoutError | EOFError)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Backoff:
    """Exponential backoff over one streak of transient errors: `delay(exc)` is how long to wait
    before the next try, or raises once the streak has lasted `window_s` seconds (or at once for
    an error that is not transient). `reset()` after a call that worked."""

    def __init__(self, window_s: float, first_s: float = 0.5, cap_s: float = 30.0):
        self.window_s, self.first_s, self.cap_s = window_s, first_s, cap_s
        self.since: float | None = None
        self.tries = 0

    def reset(self) -> None:
        self.since, self.tries = None, 0

    def delay(self, exc: BaseException, what: str) -> float:
        if not is_transient(exc):
            raise exc
        now = time.monotonic()
        self.since = now if self.since is None else self.since
        left = self.window_s - (now - self.since)
        if left <= 0:
            raise RayJobError(f"{what}: the Ray dashboard kept failing for {self.window_s:.0f}s "
                              f"({self.tries + 1} tries); last error: {describe(exc)}") from exc
        self.tries += 1
        return min(self.cap_s, self.first_s * 2 ** (self.tries - 1), left)


def job_outcome(job_id: str, job: dict, tail: list[str]) -> dict[str, Any]:
    """What a finished job reports to its task: status, message and the last lines of its log."""
    return {"status": job["status"], "job_id": job_id, "message": job.get("message") or "",
            "log_tail": "\n".join(tail[-LOG_TAIL_LINES:])}


class LogFollower:
    """The job log as lines, each handed on once and in order, across reconnects. Keeps only the
    unfinished last line (at most MAX_PARTIAL_CHARS) and the last LOG_TAIL_LINES lines."""

    def __init__(self, base: str, headers: dict[str, str], job_id: str, open_timeout: float = 30.0):
        self.url = base.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
        self.url = f"{self.url}/api/jobs/{job_id}/logs/tail"
        self.headers, self.open_timeout = headers, open_timeout
        self.received = 0  # characters of the log taken in (handed on or in `partial`)
        self.partial = ""
        self.tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.lines_out = 0

    def retained_chars(self) -> int:
        """What this follower holds between messages (for the benchmark and the tests)."""
        return len(self.partial) + sum(len(line) for line in self.tail)

    def _take(self, text: str) -> list[str]:
        self.received += len(text)
        parts = (self.partial + text).split("\n")
        self.partial = parts.pop()
        if len(self.partial) > MAX_PARTIAL_CHARS:  # a line with no end in sight: hand on what is here
            parts.append(self.partial)
            self.partial = ""
        lines = [line[:-1] if line.endswith("\r") else line for line in parts]
        self.tail.extend(line[:TAIL_LINE_CHARS] for line in lines[-LOG_TAIL_LINES:])
        self.lines_out += len(lines)
        return lines

    def finish(self) -> list[str]:
        """The last line when the log does not end with a newline (call once the job is over)."""
        if not self.partial:
            return []
        line, self.partial = self.partial, ""
        self.tail.append(line[:TAIL_LINE_CHARS])
        self.lines_out += 1
        return [line]

    async def stream(self) -> AsyncIterator[list[str]]:
        """One connection: batches of new lines until the dashboard closes the stream (normally:
        the job is over and its whole log sent). Connection errors propagate to the caller."""
        from websockets.asyncio.client import connect

        skip = self.received
        # compression=None: the dashboard head forwards the client's handshake headers to its job
        # module, and with permessage-deflate offered the relay breaks (Ray 2.60 logs "Unknown msg
        # type: 258" and the socket closes normally with no message).
        # close_timeout 1 s: a cancelled follower (a triggerer handing the trigger on, a task ended)
        # must let go at once, not wait for a busy dashboard to answer the close handshake.
        async with connect(self.url, additional_headers=self.headers, max_size=MAX_MESSAGE_BYTES,
                           open_timeout=self.open_timeout, close_timeout=1, ping_interval=20,
                           ping_timeout=30, proxy=None, compression=None) as ws:
            async for message in ws:
                text = message if isinstance(message, str) else message.decode("utf-8", "replace")
                if skip:  # sent before the reconnect: already handed on
                    if len(text) <= skip:
                        skip -= len(text)
                        continue
                    text, skip = text[skip:], 0
                if lines := self._take(text):
                    yield lines


async def async_get_job(client: httpx.AsyncClient, job_id: str) -> dict | None:
    """The job's details, or None when the cluster has no job of that id."""
    response = await client.get(f"/api/jobs/{job_id}")
    if response.status_code == 404:
        return None
    if response.status_code != 200:
        raise RayJobError(f"GET /api/jobs/{job_id}: HTTP {response.status_code}: {response.text[:300]}",
                          response.status_code)
    return response.json()


async def async_stop_job(client: httpx.AsyncClient, job_id: str) -> bool:
    response = await client.post(f"/api/jobs/{job_id}/stop")
    if response.status_code != 200:
        raise RayJobError(f"POST /api/jobs/{job_id}/stop: HTTP {response.status_code}: {response.text[:300]}",
                          response.status_code)
    return bool(response.json().get("stopped"))


async def follow_job(base: str, headers: dict[str, str], job_id: str, on_lines: Callable[[list[str]], None],
                     retry_window_s: float = DEFAULT_RETRY_WINDOW_S, http_timeout: float = 30.0,
                     poll_interval: float = 2.0, follower: LogFollower | None = None) -> dict[str, Any]:
    """Follow a job to its end: every log line to `on_lines` once, in order; returns
    `job_outcome(...)`. Transient dashboard errors are retried with backoff for `retry_window_s`
    seconds of failing in a row; others (401/403, a job the cluster doesn't know) raise at once."""
    follower = follower or LogFollower(base, headers, job_id, open_timeout=http_timeout)
    backoff = Backoff(retry_window_s)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=http_timeout) as client:
        while True:
            try:
                async for lines in follower.stream():
                    backoff.reset()
                    on_lines(lines)
                # The dashboard closed the stream: over, or (agent restarted) to be opened again.
                job = await async_get_job(client, job_id)
                if job is None:
                    raise RayJobError(f"the Ray cluster at {base} has no job {job_id}", 404)
                backoff.reset()
                if job.get("status") in TERMINAL_STATES:
                    if last := follower.finish():
                        on_lines(last)
                    return job_outcome(job_id, job, list(follower.tail))
                await asyncio.sleep(poll_interval)
            except Exception as exc:
                await asyncio.sleep(backoff.delay(exc, f"following Ray job {job_id}"))
