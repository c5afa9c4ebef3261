"""The compact view `posttrain run` prints while dag.test() runs, and the log file behind it.

Airflow, GX, Ray and vLLM write hundreds of lines per run. `redirected_output` points file
descriptors 1 and 2 at a log file, so the Ray head and job processes this run starts write there
too, not only Python's own streams; the view writes to a duplicate of the terminal's descriptor.
`LiveView` watches from a thread: the run's task instances in the metadata database (one line per
state a user cares about) and the log file's training step lines (`step 3/30 loss … tokens/s …`,
written by training_lib's MetricsLogger and relayed by the Ray job trigger) for the progress line.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

STEP = re.compile(r"\bstep (\d+)/(\d+) loss (\S+) .*?tokens/s (\S+)")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# queued/scheduled flip by several times per task under dag.test(): noise, not news.
SHOWN = {"running", "deferred", "success", "failed", "skipped", "upstream_failed", "up_for_retry",
         "up_for_reschedule", "removed", "restarting", "awaiting_input"}
FINAL = {"success", "failed", "skipped", "upstream_failed", "removed"}
# Airflow's own bookkeeping lines around every task: left out of a failing task's tail.
BOILERPLATE = ("::group::", "::endgroup::", "Task instance state updated", "Updating RenderedTaskInstanceFields",
               "Pushing xcom", "Task started", "[DAG TEST] running task", "[DAG TEST] starting task_id")


def default_log_path(name: str) -> Path:
    from posttrain.paths import posttrain_home

    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return posttrain_home() / "logs" / f"run-{name}-{stamp}-{os.getpid()}.log"


@contextmanager
def redirected_output(log_path: Path) -> Iterator[TextIO]:
    """Send descriptors 1 and 2 (this process and every process it starts) to `log_path`; yield a
    line-buffered stream on the original stdout. Both descriptors are restored on exit."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = os.dup(1), os.dup(2)
    term = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        yield term
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a stream someone closed: nothing left to flush
                pass
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log_fd):
            os.close(fd)
        term.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


class LiveView:
    """Task state lines and the training progress line, from a thread, until `stop()`."""

    def __init__(self, term: TextIO, log_path: Path, dag_id: str, after_run_row: int,
                 every: int = 0, poll_s: float = 1.0):
        self.term, self.log_path, self.dag_id = term, log_path, dag_id
        self.after_run_row = after_run_row  # the run to watch is the first with a larger row id
        self.every, self.poll_s = every, poll_s
        self.tty = term.isatty()
        self.states: dict[str, str] = {}
        self.seen: dict[str, set[str]] = {}
        self.run_id: str | None = None
        self._offset, self._partial = 0, ""
        self._progress: dict[str, Any] | None = None
        self._first: tuple[float, int] | None = None  # (time, step) the ETA is measured from
        self._next_print = 0
        self._drawn = False  # a progress line is on the terminal, not yet ended by a newline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="posttrain-live-view", daemon=True)

    def start(self) -> LiveView:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._tick()  # the last states and steps, written after the run finished
        self._end_line()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._tick()

    def _tick(self) -> None:
        try:
            self._read_log()
            self._poll_tasks()
        except Exception as exc:  # the view must never break the run it shows
            print(f"posttrain live view: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    # -- task states --------------------------------------------------------------------------
    def _poll_tasks(self) -> None:
        from airflow.models import DagRun, TaskInstance
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            if self.run_id is None:
                self.run_id = session.scalar(select(DagRun.run_id).where(
                    DagRun.dag_id == self.dag_id, DagRun.id > self.after_run_row).order_by(DagRun.id))
                if self.run_id is None:
                    return
            rows = session.execute(select(TaskInstance.task_id, TaskInstance.state, TaskInstance.start_date,
                                          TaskInstance.end_date).where(
                TaskInstance.dag_id == self.dag_id, TaskInstance.run_id == self.run_id)).all()
        for task_id, state, start, end in sorted(rows, key=lambda r: (r.start_date is None, r.start_date or 0)):
            state = str(state.value if hasattr(state, "value") else state)
            previous = self.states.get(task_id)
            if state == previous:
                continue
            self.states[task_id] = state
            if previous == "running" and state == "queued":
                state = "deferred"  # dag.test() queues a deferred task while its trigger runs inline
            seen = self.seen.setdefault(task_id, set())
            if state == "up_for_retry":
                seen.clear()  # the next try's states are news again
            # After its trigger fires a deferred task runs again: that second "running" is no news.
            if state not in SHOWN or (state == "running" and "deferred" in seen):
                continue
            seen.add(state)
            detail = ""
            if state in FINAL and start and end:
                detail = f" in {_duration((end - start).total_seconds())}"
            elif state == "deferred":
                detail = " (waiting on its Ray job)"
            self._line(f"{time.strftime('%H:%M:%S')}  {task_id:<22} {state}{detail}")

    # -- training progress --------------------------------------------------------------------
    def _read_log(self) -> None:
        with self.log_path.open("r", encoding="utf-8", errors="replace") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
            self._offset = fh.tell()
        if not chunk:
            return
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()
        latest = None
        for line in lines:
            if match := STEP.search(ANSI.sub("", line)):
                latest = match
        if latest is not None:
            self._show_step(int(latest[1]), int(latest[2]), latest[3], latest[4])

    def _show_step(self, step: int, total: int, loss: str, tokens_per_s: str) -> None:
        now = time.monotonic()
        if self._first is None or step < self._first[1]:  # a retry starts again from its checkpoint
            self._first = (now, step)
        eta = ""
        t0, s0 = self._first
        if s0 < step < total:
            eta = f"  ETA {_duration((now - t0) / (step - s0) * (total - step))}"
        rate = tokens_per_s if tokens_per_s == "None" else f"{float(tokens_per_s):.0f}"
        text = f"          train: step {step}/{total}  loss {loss}  {rate} tokens/s{eta}"
        if self.tty:
            self.term.write("\r\x1b[K" + text)
            self.term.flush()
            self._drawn = True
            return
        every = self.every or max(1, -(-total // 5))  # about five lines per training run
        if step >= self._next_print or step == total:
            self._line(text)
            self._next_print = (step // every + 1) * every

    def _end_line(self) -> None:
        if self._drawn:
            self.term.write("\n")
            self._drawn = False

    def _line(self, text: str) -> None:
        self._end_line()
        self.term.write(text + "\n")
        self.term.flush()


def last_run_row(dag_id: str) -> int:
    """The largest dag_run row id of `dag_id` so far (0 if none): the run dag.test() starts next
    is the first one past it."""
    from airflow.models import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    with create_session() as session:
        return session.scalar(select(func.max(DagRun.id)).where(DagRun.dag_id == dag_id)) or 0


def task_log_tail(log_path: Path, task_id: str, lines: int = 20) -> list[str]:
    """The last `lines` lines a task wrote in its last try: dag.test() runs one task at a time and
    marks where each starts and ends, so the slice between the marks is that task's log."""
    text = ANSI.sub("", log_path.read_text(encoding="utf-8", errors="replace")).splitlines()
    start = max((i for i, line in enumerate(text) if f"[DAG TEST] starting task_id={task_id} " in line), default=0)
    end = next((i for i in range(start + 1, len(text)) if f"[DAG TEST] end task task_id={task_id} " in text[i]),
               len(text))
    kept = [line for line in text[start:end] if not any(b in line for b in BOILERPLATE)]
    return kept[-lines:]
