"""What the MLflow Model Registry and the champion Asset say about a model: the registry's tracking
URI on the Airflow side, the model version's tags, the UI links and the Asset event's lineage.

Torch-free and airflow-free (pure data): the operators build on it, and the tests check it alone.
The registry calls themselves are in posttrain/hooks/mlflow.py.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import quote

from posttrain.recipe import Recipe
from posttrain.uris import local_path

TAG = "posttrain."  # every tag this provider sets starts with it
CHAMPION_ALIAS = "champion"


def registry_uri(recipe: Recipe) -> tuple[str | None, str | None]:
    """(tracking URI, None), or (None, why there is no registry). The default is the SQLite file the
    training job tracks into (training_lib/tracking.py): for an s3:// root that one lives in each
    run's workspace (SQLite can't sit on S3), so there is no shared registry to register in."""
    if recipe.tracking.mlflow_uri:
        return recipe.tracking.mlflow_uri, None
    if recipe.storage.root.startswith("s3://"):
        return None, ("no MLflow registry: storage.root is on S3 and tracking.mlflow_uri is not set "
                      "(the default SQLite database is per run there)")
    return f"sqlite:///{local_path(recipe.storage.root).resolve() / recipe.name / 'mlflow.db'}", None


def ui_url(recipe: Recipe) -> str | None:
    """Where people browse the tracking store: tracking.ui_url, else the tracking server itself."""
    if recipe.tracking.ui_url:
        return recipe.tracking.ui_url.rstrip("/")
    uri = recipe.tracking.mlflow_uri or ""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


def run_link(ui: str | None, experiment_id: str | None, run_id: str | None) -> str | None:
    if not (ui and experiment_id and run_id):
        return None
    return f"{ui}/#/experiments/{experiment_id}/runs/{run_id}"


def version_link(ui: str | None, name: str, version: str | None) -> str | None:
    if not (ui and version):
        return None
    return f"{ui}/#/models/{quote(name, safe='')}/versions/{version}"


def digest(data: Any) -> str:
    """sha256 of canonical JSON: the same recipe (or manifest) gives the same hash on every machine."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def version_tags(recipe: Recipe, *, recipe_json: dict, manifest: dict | None, eval_meta: dict,
                 run_id: str, workspace: str, metrics: dict[str, Any], provider_version: str) -> dict[str, str]:
    """The model version's tags: what it was trained from and how it scored."""
    tags = {
        "recipe": recipe.name, "recipe_sha256": digest(recipe_json), "paradigm": recipe.paradigm,
        "base_model": recipe.model.base, "airflow_run_id": run_id, "workspace": workspace,
        "provider_version": provider_version,
        # The prepared data as the trainer saw it (shards, token counts, packing), and the tokenizer.
        "data_manifest_sha256": digest(manifest) if manifest else "",
        "tokenizer_fingerprint": (manifest or {}).get("tokenizer", {}).get("fingerprint", ""),
        "eval_fingerprint": eval_meta.get("eval_fingerprint") or "",
        "train_data": recipe.data.train, "eval_data": recipe.data.eval or "",
    }
    tags.update({f"metric.{k}": f"{v:.6g}" for k, v in metrics.items() if isinstance(v, (int, float))})
    return {TAG + k: str(v) for k, v in tags.items() if v != ""}


def decision_tags(decision: dict[str, Any]) -> dict[str, str]:
    """The promotion's numbers, as tags of the promoted version."""
    tags = {"promoted_version": decision.get("version"), "decision": decision.get("decision"),
            "decision_metric": decision.get("metric"), "decision_value": decision.get("value"),
            "decision_reason": decision.get("reason"), "promoted_uri": decision.get("model_uri")}
    comparison = decision.get("comparison") or {}
    for key, value in comparison.items():
        if isinstance(value, (int, float, str)):
            tags[f"comparison.{key}"] = value
    return {TAG + k: (f"{v:.6g}" if isinstance(v, float) else str(v))[:5000]
            for k, v in tags.items() if v is not None}


def asset_extra(decision: dict[str, Any], registry: dict[str, Any], run_id: str) -> dict[str, Any]:
    """The champion Asset event's extra: what a DAG scheduled on the champion needs to know about
    the model it got (JSON values only; Airflow stores the extra as JSON)."""
    comparison = decision.get("comparison") or {}
    return {
        "version": decision.get("version"), "model_uri": decision.get("model_uri"),
        "metric": decision.get("metric"), "value": decision.get("value"),
        "decision": decision.get("decision"), "reason": decision.get("reason"),
        "difference": comparison.get("difference"),
        "interval": [comparison["low"], comparison["high"]] if "low" in comparison else None,
        "confidence_level": comparison.get("confidence_level"), "n": comparison.get("n"),
        "run_id": run_id,
        "mlflow_run_id": registry.get("run_id"), "registered_model": registry.get("name"),
        "model_version": registry.get("version"), "tracking_uri": registry.get("tracking_uri"),
    }
