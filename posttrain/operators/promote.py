"""promote: make the run's model the champion if it beats the current one.

The model is copied to `<root>/<recipe>/promoted/<version>/` first, inside the store (S3
CopyObject or a local file copy, never through this worker where source and target share a store),
checked file by file against the export's commit.json at the target, which gets its own commit.json
last (posttrain/storage_promote.py); the run's per-example eval results go to
`<root>/<recipe>/evaluations/<version>/` (so a later run can pair its examples with the champion's).
Only then is the champion pointer swapped, by a conditional write on the version read when the
decision was made, so a reader never sees a pointer to a partial copy, and of two runs promoting at
once only one swaps from a given champion. The other re-reads the pointer and decides again against
the new champion (at most RACE_ATTEMPTS times): the outcome is the one the two would have had one
after the other, and its decision.json says that the champion changed under it. When the challenger
loses, the task is skipped: the champion Asset gets no event, and downstream DAGs scheduled on it
don't run for nothing.

`promotion.decision`: `confidence` (default) promotes only when the paired bootstrap interval of
challenger − champion clears min_improvement (posttrain/promotion_stats.py); when the two cannot be
paired (a champion promoted before per-example results existed, another eval set or tokenizer) it
says so and does not promote. `mean` compares the two aggregates.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from airflow.sdk.exceptions import AirflowSkipException

from posttrain.links import MlflowModelVersionLink, MlflowRunLink, RunReportLink
from posttrain.operators.registry import ModelRegistryMixin
from posttrain.paths import safe_name
from posttrain.promotion_decision import PER_EXAMPLE, decide, decide_against  # noqa: F401 (decide re-exported)
from posttrain.promotion_stats import Table, read_table
from posttrain.storage_fs import COMMIT
from posttrain.storage_promote import copy_tree_verified, copy_verified, read_versioned, sha256_of, write_if

# How often a run re-decides after another run swapped the champion under it before it gives up.
RACE_ATTEMPTS = 5


class PromoteOperator(ModelRegistryMixin):
    ui_color = "#fef7e0"
    operator_extra_links = (MlflowRunLink(), MlflowModelVersionLink(), RunReportLink())

    def lineage(self, recipe: Any) -> tuple[list[str], list[str]]:
        """Read: the run's export and eval results; written (when promoted): the copy and the pointer."""
        decision = self.storage.read_json(f"{self.workspace}/promotion/decision.json")
        inputs = [f"{self.workspace}/{decision.get('artifact', 'model')}", f"{self.workspace}/{PER_EXAMPLE}"]
        if not decision["promoted"]:
            return inputs, []
        return inputs, [decision["model_uri"], decision["per_example_uri"], recipe.champion_uri]

    def execute(self, context: Any) -> dict[str, Any]:
        recipe = self.load_recipe()
        p = recipe.promotion
        metrics = self.storage.read_json(f"{self.workspace}/eval/metrics.json")
        if p.metric not in metrics:
            raise KeyError(f"promotion.metric {p.metric!r} is not in {self.workspace}/eval/metrics.json "
                           f"(has {sorted(metrics)})")
        value = float(metrics[p.metric])
        version = safe_name(context["run_id"])
        mine = self._table(f"{self.workspace}/{PER_EXAMPLE}")
        pointer = self.storage.store(recipe.champion_uri)
        raced: list[str] = []  # the champions another run swapped in while this one promoted
        moved: dict[str, Any] | None = None
        made_copy = False  # whether this try made the copy (not an earlier try's, which a pointer may name)
        for _ in range(RACE_ATTEMPTS):
            data, token = read_versioned(pointer)
            champion = json.loads(data) if data is not None else None
            decision = self._decide(recipe, value, mine, champion)
            if raced:
                decision["reason"] += (f" (decided again: run(s) {', '.join(raced)} became champion while this one "
                                       "promoted)")
                decision["lost_race_to"] = raced
            if not decision["promoted"]:
                if made_copy:  # copied, then lost a race and the new decision: no pointer names the copy
                    self._drop_copy(recipe, version)
                break
            if moved is None:
                made_copy = not (self.storage.store(self._targets(recipe, version)[0]) / COMMIT).exists()
                moved = self._copy(recipe, version, mine)
            record = self._record(recipe, version, value, mine, champion, context, moved)
            if write_if(pointer, json.dumps(record, indent=2).encode(), token):
                decision.update(moved, version=version)
                break
            raced.append(self._current_version(pointer))
            self.log.warning("champion %s changed to %s since it was read; deciding again", pointer, raced[-1])
        else:
            raise RuntimeError(f"{pointer} changed {RACE_ATTEMPTS} times while this run promoted "
                               f"(to {', '.join(raced)}); retry the task")
        if decision["promoted"]:  # after the pointer moved, the registry and the Asset event follow it
            decision["registry"] = self.register_promotion(context, recipe, decision)
            self.publish_lineage(context, decision)
        if (approval := self._read("promotion/approval.json")) is not None:  # who approved (approval gate)
            decision["approval"] = approval
        reason = decision["reason"]
        self.storage.write_json_atomic(f"{self.workspace}/promotion/decision.json", decision)
        self.log.info("promotion: %s", reason)
        if not decision["promoted"]:
            context["ti"].xcom_push(key="return_value", value=decision)
            raise AirflowSkipException(f"not promoted: {reason}")
        return decision

    def _decide(self, recipe: Any, value: float, mine: Table | None, champion: dict | None) -> dict[str, Any]:
        """The decision against `champion` (the approval gate showed the reviewer the same one)."""
        return decide_against(recipe.promotion, recipe.champion_uri, value, mine, champion, self._table)

    def _current_version(self, pointer: Any) -> str:
        data, _ = read_versioned(pointer)
        return json.loads(data)["version"] if data is not None else "(none)"

    def _table(self, uri: str) -> Table | None:
        if not self.storage.exists(uri):
            return None
        with self.storage.path(uri).open("rb") as fh:
            return read_table(fh)

    def _targets(self, recipe: Any, version: str) -> tuple[str, str]:
        root = f"{recipe.storage.root}/{recipe.name}"
        return f"{root}/promoted/{version}", f"{root}/evaluations/{version}/per_example.parquet"

    def _copy(self, recipe: Any, version: str, mine: Table | None) -> dict[str, Any]:
        """Copy the model and the per-example results inside the store, checked; returns what moved."""
        target, per_example_uri = self._targets(recipe, version)
        # The merged model, or the adapter alone when the recipe exports only that.
        artifact = "model" if self.storage.exists(f"{self.workspace}/model") else "adapter"
        files = copy_tree_verified(self.storage.store(f"{self.workspace}/{artifact}"), self.storage.store(target))
        if mine is None:
            per_example_uri = None
        else:  # next to the model's other records, not inside the model folder; small, so hashed here
            src = self.storage.store(f"{self.workspace}/{PER_EXAMPLE}")
            with src.open("rb") as fh:
                copy_verified(src, self.storage.store(per_example_uri), sha256_of(fh))
        return {"model_uri": target, "artifact": artifact, "files": len(files), "per_example_uri": per_example_uri}

    def _drop_copy(self, recipe: Any, version: str) -> None:
        for uri in self._targets(recipe, version):
            self.storage.store(uri).remove()

    def _record(self, recipe: Any, version: str, value: float, mine: Table | None, champion: dict | None,
                context: Any, moved: dict[str, Any]) -> dict[str, Any]:
        """The champion pointer's content."""
        p = recipe.promotion
        meta = mine[1] if mine is not None else {}
        return {"version": version, "model_uri": moved["model_uri"], "artifact": moved["artifact"],
                "metric": p.metric, "value": value, "mode": p.mode, "run_id": context["run_id"],
                "dag_id": context["ti"].dag_id, "workspace": self.workspace,
                "promoted_at": datetime.now(UTC).isoformat(),
                "previous_version": champion["version"] if champion else None,
                "per_example_uri": moved["per_example_uri"], "eval_fingerprint": meta.get("eval_fingerprint"),
                "tokenizer_fingerprint": meta.get("tokenizer_fingerprint")}
