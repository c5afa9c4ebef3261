"""promote: make the run's model the champion if it beats the current one.

The model is copied to `<root>/<recipe>/promoted/<version>/` first; only then is the champion
pointer replaced (written aside and renamed), so a reader never sees a pointer to a partial copy.
When the challenger loses, the task is skipped: the champion Asset gets no event, and downstream
DAGs scheduled on it don't run for nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from airflow.sdk.exceptions import AirflowSkipException

from posttrain.operators.base import PosttrainOperator
from posttrain.paths import safe_name


def decide(value: float, champion: dict | None, mode: str, min_improvement: float, metric: str) -> tuple[bool, str]:
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
        promote, reason = decide(value, champion, p.mode, p.min_improvement, p.metric)
        version = safe_name(context["run_id"])
        decision = {"promoted": promote, "reason": reason, "metric": p.metric, "value": value,
                    "champion_uri": champion_uri, "previous_champion": champion}
        if promote:
            target = f"{recipe.storage.root}/{recipe.name}/promoted/{version}"
            self.storage.remove_tree(target)  # a retried task starts its copy over
            # The merged model, or the adapter alone when the recipe exports only that.
            artifact = "model" if self.storage.exists(f"{self.workspace}/model") else "adapter"
            files = self.storage.copy_tree(f"{self.workspace}/{artifact}", target)
            record = {"version": version, "model_uri": target, "artifact": artifact, "metric": p.metric, "value": value,
                      "mode": p.mode, "run_id": context["run_id"], "dag_id": context["ti"].dag_id,
                      "workspace": self.workspace, "promoted_at": datetime.now(UTC).isoformat(),
                      "previous_version": champion["version"] if champion else None}
            self.storage.write_json_atomic(champion_uri, record)
            decision.update(version=version, model_uri=target, files=files)
        self.storage.write_json_atomic(f"{self.workspace}/promotion/decision.json", decision)
        self.log.info("promotion: %s", reason)
        if not promote:
            context["ti"].xcom_push(key="return_value", value=decision)
            raise AirflowSkipException(f"not promoted: {reason}")
        return decision
