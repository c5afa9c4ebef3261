"""approve_promotion: a person approves the promotion (`promotion.approval: required`).

Airflow's human-in-the-loop ApprovalOperator between evaluate and promote. Before it waits, it
computes what promote would decide against the current champion (posttrain/promotion_decision.py,
the same function promote calls) and shows it as the task's body: the metric, the paired interval,
the rule's verdict and a few generations side by side. The preview is kept in
`promotion/review.json`.

- Approve: promote runs (and decides by the rule; `promotion/approval.json` names the reviewer).
- Reject: promote is skipped; `promotion/decision.json` says not promoted, by whom and why.
- No answer within `promotion.approval_timeout`: Reject is taken as the default (Airflow's
  scheduler applies it), so the model is not promoted and decision.json says no one answered.
On Airflow 3.3 the task waits in the `awaiting_input` state: no worker slot, no trigger.
"""

from __future__ import annotations

import json
from datetime import timedelta
from functools import cached_property
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import Param

from posttrain.hooks.storage import StorageHook
from posttrain.paths import safe_name
from posttrain.promotion_decision import PER_EXAMPLE, champion_table, decide_against, review_markdown, side_by_side
from posttrain.promotion_stats import Table, read_table
from posttrain.recipe import Recipe
from posttrain.storage_promote import read_versioned

SAMPLES = 5  # generations shown side by side


class PromotionApprovalOperator(ApprovalOperator):
    template_fields = ("workspace", "subject", "body")
    ui_color = "#fde7e9"

    def __init__(self, *, workspace: str, approval_timeout_s: int, storage_conn_id: str | None = None,
                 **kwargs: Any):
        super().__init__(
            subject="Promote this run's model?",
            body="(the comparison is computed when the task starts)",
            defaults="Reject",  # what the scheduler takes when no one answers in time
            response_timeout=timedelta(seconds=approval_timeout_s),
            params={"reason": Param("", type="string", title="Reason",
                                    description="Why (kept in the run's promotion/decision.json)")},
            **kwargs)
        self.workspace = workspace
        self.storage_conn_id = storage_conn_id
        self.approval_timeout_s = approval_timeout_s

    @cached_property
    def storage(self) -> StorageHook:
        return StorageHook(self.storage_conn_id)

    def _table(self, uri: str) -> Table | None:
        if not self.storage.exists(uri):
            return None
        with self.storage.path(uri).open("rb") as fh:
            return read_table(fh)

    def review(self, recipe: Recipe) -> dict[str, Any]:
        """What promote would decide now, and the generations to read beside it."""
        metrics = self.storage.read_json(f"{self.workspace}/eval/metrics.json")
        metric = recipe.promotion.metric
        if metric not in metrics:
            raise KeyError(f"promotion.metric {metric!r} is not in {self.workspace}/eval/metrics.json "
                           f"(has {sorted(metrics)})")
        mine = self._table(f"{self.workspace}/{PER_EXAMPLE}")
        data, _ = read_versioned(self.storage.store(recipe.champion_uri))
        champion = json.loads(data) if data is not None else None
        decision = decide_against(recipe.promotion, recipe.champion_uri, float(metrics[metric]), mine, champion,
                                  self._table)
        theirs = champion_table(mine, champion, self._table)[0] if champion is not None else None
        return {"decision": decision, "samples": side_by_side(mine, theirs, SAMPLES)}

    def execute(self, context: Any) -> Any:
        recipe = Recipe.model_validate(self.storage.read_json(f"{self.workspace}/recipe.json"))
        review = self.review(recipe)
        self.storage.write_json_atomic(f"{self.workspace}/promotion/review.json", review)
        version = safe_name(context["run_id"])
        self.subject = f"Promote {recipe.name} run {version}?"
        self.body = review_markdown(review["decision"], review["samples"], self.approval_timeout_s)
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        # Recorded before the base class acts on the answer: on Reject it skips promote by raising
        # (Airflow's SkipMixin), so nothing after it would run.
        if "error" not in event:
            self.validate_chosen_options(event["chosen_options"])
            self._record(event)
        return super().execute_complete(context, event)

    def _record(self, event: dict[str, Any]) -> None:
        """approval.json (who answered what, or that no one did), and for anything but Approve the
        run's decision.json: not promoted, by whom and why."""
        approved = event["chosen_options"] == [self.APPROVE]
        user = event.get("responded_by_user") or {}
        responded_at = event.get("responded_at")
        record = {"approved": approved, "timed_out": bool(event.get("timedout")),
                  "reviewer": user.get("name"), "reviewer_id": user.get("id"),
                  "reason": (event.get("params_input") or {}).get("reason") or None,
                  "responded_at": responded_at.isoformat() if hasattr(responded_at, "isoformat") else responded_at}
        self.storage.write_json_atomic(f"{self.workspace}/promotion/approval.json", record)
        if not approved:
            review = self.storage.read_json(f"{self.workspace}/promotion/review.json")
            if record["timed_out"]:
                reason = f"no answer to the approval task within {self.approval_timeout_s} s, so not promoted"
            else:
                reason = f"rejected by {record['reviewer']}" + (f": {record['reason']}" if record["reason"] else "")
            decision = {**review["decision"], "promoted": False, "reason": reason, "approval": record,
                        "rule_reason": review["decision"]["reason"], "rule_promoted": review["decision"]["promoted"]}
            self.storage.write_json_atomic(f"{self.workspace}/promotion/decision.json", decision)
            self.log.info("promotion: %s", reason)
