"""promote: make the run's model the champion if it beats the current one.

The model is copied to `<root>/<recipe>/promoted/<version>/` first, and the run's per-example eval
results to `<root>/<recipe>/evaluations/<version>/` (so a later run can pair its examples with the
champion's); only then is the champion pointer replaced (written aside and renamed), so a reader
never sees a pointer to a partial copy. When the challenger loses, the task is skipped: the
champion Asset gets no event, and downstream DAGs scheduled on it don't run for nothing.

`promotion.decision`: `confidence` (default) promotes only when the paired bootstrap interval of
challenger − champion clears min_improvement (posttrain/promotion_stats.py); when the two cannot be
paired (a champion promoted before per-example results existed, another eval set or tokenizer) it
says so and does not promote. `mean` compares the two aggregates.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from airflow.sdk.exceptions import AirflowSkipException

from posttrain.operators.base import PosttrainOperator
from posttrain.paths import safe_name
from posttrain.promotion_stats import Paired, Table, compare, decide_by_interval, read_table

PER_EXAMPLE = "eval/per_example.parquet"


def decide(value: float, champion: dict | None, mode: str, min_improvement: float, metric: str) -> tuple[bool, str]:
    """The `mean` decision: the challenger's aggregate against the champion's."""
    if champion is None:
        return True, f"no champion yet; {metric} {value:.6g}"
    best = champion["value"]
    gain = (best - value) if mode == "min" else (value - best)
    verb = "lower" if mode == "min" else "higher"
    if gain > min_improvement or (min_improvement == 0 and gain > 0):
        return True, f"{metric} {value:.6g} beats champion {champion['version']} ({best:.6g}) by {gain:.6g}"
    return False, (f"{metric} {value:.6g} is not {verb} than champion {champion['version']} ({best:.6g}) "
                   f"by more than {min_improvement:g}")


class PromoteOperator(PosttrainOperator):
    ui_color = "#fef7e0"

    def execute(self, context: Any) -> dict[str, Any]:
        recipe = self.load_recipe()
        p = recipe.promotion
        metrics = self.storage.read_json(f"{self.workspace}/eval/metrics.json")
        if p.metric not in metrics:
            raise KeyError(f"promotion.metric {p.metric!r} is not in {self.workspace}/eval/metrics.json "
                           f"(has {sorted(metrics)})")
        value = float(metrics[p.metric])
        champion_uri = recipe.champion_uri
        champion = self.storage.read_json(champion_uri) if self.storage.exists(champion_uri) else None
        mine = self._table(f"{self.workspace}/{PER_EXAMPLE}")
        paired, why = None, None
        if champion is not None:
            paired, why = self._pair(mine, champion, p.metric, p.confidence_level, p.bootstrap_resamples,
                                     p.bootstrap_seed)
        if champion is None or p.decision == "mean":
            promote, reason = decide(value, champion, p.mode, p.min_improvement, p.metric)
        elif paired is None:
            promote, reason = False, (f"could not compare with champion {champion['version']} example by "
                                      f"example ({why}), so not promoted (promotion.decision: confidence)")
        else:
            promote, reason = decide_by_interval(paired, p.mode, p.min_improvement, champion["version"])
        version = safe_name(context["run_id"])
        decision = {"promoted": promote, "reason": reason, "decision": p.decision, "metric": p.metric,
                    "value": value, "comparison": paired.as_dict() if paired else None,
                    "champion_uri": champion_uri, "previous_champion": champion}
        if promote:
            decision.update(self._promote(recipe, version, value, mine, champion, context))
            decision["version"] = version
        self.storage.write_json_atomic(f"{self.workspace}/promotion/decision.json", decision)
        self.log.info("promotion: %s", reason)
        if not promote:
            context["ti"].xcom_push(key="return_value", value=decision)
            raise AirflowSkipException(f"not promoted: {reason}")
        return decision

    def _table(self, uri: str) -> Table | None:
        if not self.storage.exists(uri):
            return None
        with self.storage.path(uri).open("rb") as fh:
            return read_table(fh)

    def _pair(self, mine: Table | None, champion: dict, metric: str, level: float, resamples: int,
              seed: int) -> tuple[Paired | None, str | None]:
        if mine is None:
            return None, f"this run's evaluation wrote no {PER_EXAMPLE}"
        uri = champion.get("per_example_uri")
        if not uri:
            return None, "the champion has no per-example results (promoted before they were recorded)"
        try:
            theirs = self._table(uri)
        except (OSError, ValueError) as exc:  # not Parquet, or unreadable: no pairing, no promotion
            return None, f"the champion's per-example results {uri} could not be read ({exc})"
        if theirs is None:
            return None, f"the champion's per-example results {uri} are gone"
        return compare(mine, theirs, metric, level, resamples, seed)

    def _promote(self, recipe: Any, version: str, value: float, mine: Table | None, champion: dict | None,
                 context: Any) -> dict[str, Any]:
        """Copy the model and the per-example results, then move the pointer; returns what moved."""
        p = recipe.promotion
        target = f"{recipe.storage.root}/{recipe.name}/promoted/{version}"
        self.storage.remove_tree(target)  # a retried task starts its copy over
        # The merged model, or the adapter alone when the recipe exports only that.
        artifact = "model" if self.storage.exists(f"{self.workspace}/model") else "adapter"
        files = self.storage.copy_tree(f"{self.workspace}/{artifact}", target)
        per_example_uri = None
        if mine is not None:  # next to the model's other records, not inside the model folder
            per_example_uri = f"{recipe.storage.root}/{recipe.name}/evaluations/{version}/per_example.parquet"
            dst = self.storage.path(per_example_uri)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(self.storage.path(f"{self.workspace}/{PER_EXAMPLE}").read_bytes())
        meta = mine[1] if mine is not None else {}
        record = {"version": version, "model_uri": target, "artifact": artifact, "metric": p.metric, "value": value,
                  "mode": p.mode, "run_id": context["run_id"], "dag_id": context["ti"].dag_id,
                  "workspace": self.workspace, "promoted_at": datetime.now(UTC).isoformat(),
                  "previous_version": champion["version"] if champion else None,
                  "per_example_uri": per_example_uri, "eval_fingerprint": meta.get("eval_fingerprint"),
                  "tokenizer_fingerprint": meta.get("tokenizer_fingerprint")}
        self.storage.write_json_atomic(recipe.champion_uri, record)
        return {"model_uri": target, "files": files, "per_example_uri": per_example_uri}
