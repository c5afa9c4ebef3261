"""The pieces of `posttrain run`'s live view that need no Airflow: the descriptor-level redirect
(a child process's output lands in the log too), the progress line read from the log's step lines,
and a failed task's log tail. The view on a real run is checked in tests/e2e/test_tiny_dag.py."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.live_view import LiveView, redirected_output, task_log_tail

JOB = ("2026-12-04T17:12:15.295291Z [info     ] [ray job posttrain-x-train-try1] "
       "\x1b[36m(RayTrainWorker pid=5969)\x1b[0m ")


def test_redirect_sends_this_process_and_its_children_to_the_log(tmp_path: Path,
                                                                 capfd: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "logs" / "run.log"
    with redirected_output(log) as term:
        subprocess.run([sys.executable, "-c", "import sys; print('child out'); print('child err', file=sys.stderr)"],
                       check=True)
        term.write("for the user\n")
    print("after the run")
    out, err = capfd.readouterr()
    assert log.read_text().splitlines() == ["child out", "child err"]
    assert out.splitlines() == ["for the user", "after the run"] and err == ""


def write_steps(log: Path, steps: range, total: int) -> None:
    with log.open("a") as fh:
        for step in steps:
            fh.write(f"{JOB}step {step}/{total} loss {6 - step / 10:.4f} lr 1.00e-03 grad_norm 2.446 "
                     f"tokens/s {1000.0 + step} [posttrain.triggers.ray.RayJobTrigger] loc=ray.py:83\n")
        fh.write("unrelated line, no newline yet")


def test_progress_lines_off_a_terminal_every_n_steps(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    log.write_text("")
    term = io.StringIO()
    view = LiveView(term, log, "d", 0, every=10)
    write_steps(log, range(1, 4), 30)
    view._read_log()
    write_steps(log, range(4, 13), 30)  # steps 4..12 in one read: one line, the latest step
    view._read_log()
    write_steps(log, range(13, 31), 30)
    view._read_log()
    lines = term.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["3/30", "12/30", "30/30"]
    assert lines[0].strip() == "train: step 3/30  loss 5.7000  1003 tokens/s"  # no ETA before a second reading
    assert "ETA" in lines[1] and "ETA" not in lines[2]


def test_a_failed_task_tail_is_its_own_last_try(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    def start(task: str) -> str:
        return f"[info     ] [DAG TEST] starting task_id={task} map_index=-1 [airflow.sdk.definitions.dag]"

    def end(task: str) -> str:
        return f"[info     ] [DAG TEST] end task task_id={task} map_index=-1 [airflow.sdk.definitions.dag]"

    log.write_text("\n".join([
        start("train"), "try 1 line", end("train"),
        start("train"), "::endgroup::", "\x1b[31mValueError: bad row 3\x1b[0m", end("train"),
        start("ray_cluster_teardown"), "teardown line"]) + "\n")
    assert task_log_tail(log, "train") == ["ValueError: bad row 3"]
    assert task_log_tail(log, "ray_cluster_teardown") == ["teardown line"]
