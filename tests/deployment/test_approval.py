"""The approval gate (`promotion.approval: required`) through the real deployment and the REST
API's human-in-the-loop endpoints, as a reviewer answers it: approve → promote runs; reject →
promote is skipped with the reviewer and reason in decision.json; no answer within
`promotion.approval_timeout` → not promoted. One DAG (tiny-sft on the existing Ray cluster), three
runs: the first approved and the third left unanswered side by side, then the second (which
compares with the first's champion) rejected."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from posttrain.paths import run_workspace
from posttrain.uris import local_path
from tests.deployment.conftest import APPROVAL_DAG, APPROVAL_TIMEOUT_S, Deployment, run_path

pytestmark = [pytest.mark.slow, pytest.mark.deployment]
GATE = "approve_promotion"
READ_S = 10  # how long the reviewer reads before answering


def _hitl(deployment: Deployment, run_id: str) -> str:
    return f"{run_path(APPROVAL_DAG, run_id)}/taskInstances/{GATE}/-1/hitlDetails"


def _wait_for_gate(deployment: Deployment, run_id: str) -> dict[str, Any]:
    """Once the run's gate waits for input: its request as the UI shows it."""
    deployment.wait_for_task(APPROVAL_DAG, run_id, GATE, ("awaiting_input", "failed", "upstream_failed"),
                             timeout=600)
    assert deployment.task_states(APPROVAL_DAG, run_id)[GATE] == "awaiting_input"
    return deployment.api("GET", _hitl(deployment, run_id))


def _answer(deployment: Deployment, run_id: str, option: str, reason: str) -> None:
    """Answer the gate as a reviewer does, after reading: Airflow 3.3's scheduler fails a task whose
    answer requeues it before the executor's event for its pause was processed (seen when answering
    within a second of `awaiting_input`: "finished with state success, but the task instance's state
    attribute is queued" → failed), which a person never does."""
    time.sleep(READ_S)
    deployment.api("PATCH", _hitl(deployment, run_id), json={"chosen_options": [option],
                                                              "params_input": {"reason": reason}})


def _start_and_wait_for_gate(deployment: Deployment) -> tuple[str, dict[str, Any]]:
    run_id = deployment.trigger(APPROVAL_DAG, {})
    return run_id, _wait_for_gate(deployment, run_id)


def _workspace(deployment: Deployment, run_id: str) -> Path:
    return local_path(run_workspace(str(deployment.storage), APPROVAL_DAG.removeprefix("posttrain__"), run_id))


def test_approve_reject_and_no_answer(deployment: Deployment) -> None:
    # 1. Approve: promote runs and the first champion is the approved run. (The third run starts
    # beside it: no one will answer its gate.)
    first, third = deployment.trigger(APPROVAL_DAG, {}), deployment.trigger(APPROVAL_DAG, {})
    request = _wait_for_gate(deployment, first)
    assert request["options"] == ["Approve", "Reject"] and request["defaults"] == ["Reject"]
    assert "eval_loss" in request["body"] and "champion**: none yet" in request["body"]
    _answer(deployment, first, "Approve", "looks fine")
    assert deployment.wait_for_run(APPROVAL_DAG, first, timeout=300)["state"] == "success"
    states = deployment.task_states(APPROVAL_DAG, first)
    assert states[GATE] == "success" and states["promote"] == "success", states
    decision = json.loads((_workspace(deployment, first) / "promotion/decision.json").read_text())
    assert decision["promoted"] and decision["approval"]["reviewer"] == deployment.username

    # 2. Reject: the reviewer saw the paired comparison with the champion; promote is skipped.
    second, request = _start_and_wait_for_gate(deployment)
    assert "paired difference" in request["body"] and "interval [" in request["body"], request["body"]
    assert "| example | challenger | champion |" in request["body"]
    _answer(deployment, second, "Reject", "answers too short")
    assert deployment.wait_for_run(APPROVAL_DAG, second, timeout=300)["state"] == "success"
    assert deployment.task_states(APPROVAL_DAG, second)["promote"] == "skipped"
    decision = json.loads((_workspace(deployment, second) / "promotion/decision.json").read_text())
    assert not decision["promoted"]
    assert decision["reason"] == f"rejected by {deployment.username}: answers too short"
    assert decision["comparison"]["n"] > 0 and decision["previous_champion"]["run_id"] == first

    # 3. No answer: the scheduler takes the default (Reject) after the timeout; not promoted.
    assert deployment.wait_for_run(APPROVAL_DAG, third, timeout=APPROVAL_TIMEOUT_S + 600)["state"] == "success"
    assert deployment.task_states(APPROVAL_DAG, third)["promote"] == "skipped"
    decision = json.loads((_workspace(deployment, third) / "promotion/decision.json").read_text())
    assert not decision["promoted"] and decision["approval"]["timed_out"]
    assert f"no answer to the approval task within {APPROVAL_TIMEOUT_S} s" in decision["reason"]
    # The champion is still the approved run's.
    champion = json.loads(local_path(decision["champion_uri"]).read_text())
    assert champion["run_id"] == first
