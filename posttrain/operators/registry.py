"""The MLflow Model Registry and the champion Asset's lineage, for the evaluate and promote tasks.

Every evaluated model becomes a model version (source: the run workspace's export, nothing
copied), recorded in `eval/registry.json`; a promotion tags that version with the decision's
numbers and moves the alias `champion` to it, after the champion pointer moved. The registry is a
side channel: an MLflow error is logged as a warning and recorded (`eval/registry.json`, and
`registry.error` in decision.json), never lost and never failing the task, since the champion
pointer is what the pipeline trusts.
"""

from __future__ import annotations

from typing import Any

from posttrain.links import MlflowModelVersionLink, MlflowRunLink
from posttrain.operators.base import PosttrainOperator
from posttrain.provider import __version__
from posttrain.recipe import Recipe
from posttrain.registry import asset_extra, decision_tags, registry_uri, run_link, ui_url, version_link, version_tags

REGISTRY_RECORD = "eval/registry.json"


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


class ModelRegistryMixin(PosttrainOperator):
    def _read(self, rel: str) -> dict | None:
        uri = f"{self.workspace}/{rel}"
        return self.storage.read_json(uri) if self.storage.exists(uri) else None

    def training_run_id(self, tracking_uri: str) -> str | None:
        """The MLflow run of the training job, when it tracked into this registry's store."""
        run = self._read("train/mlflow_run.json") or {}
        return run.get("run_id") if run.get("tracking_uri") == tracking_uri else None

    @staticmethod
    def push_link(context: Any, link: type, url: str | None) -> None:
        """Always pushed, "" where there is no UI to point at: the task runner looks every link up
        when the task ends and logs an error for a missing one."""
        context["ti"].xcom_push(key=link().xcom_key, value=url or "")

    def link_training_run(self, context: Any, recipe: Recipe) -> None:
        """The "MLflow run" link, where a UI serves the store (no mlflow import otherwise)."""
        uri, _ = registry_uri(recipe)
        ui = ui_url(recipe)
        run_id = self.training_run_id(uri) if uri else None
        url = None
        if ui and run_id:
            from posttrain.hooks.mlflow import MlflowRegistryHook

            try:
                url = run_link(ui, MlflowRegistryHook(uri).experiment_of(run_id), run_id)
            except Exception as exc:  # a link is not worth failing a task for
                self.log.warning("no MLflow run link: %s", first_line(exc))
        self.push_link(context, MlflowRunLink, url)

    def register_evaluated(self, context: Any, recipe: Recipe, metrics: dict[str, Any]) -> dict[str, Any]:
        """Register this run's model as a version; returns (and writes) the registry record."""
        uri, why = registry_uri(recipe)
        record: dict[str, Any] = {"tracking_uri": uri, "name": recipe.name}
        if uri is None:
            record["error"] = why
        else:
            try:
                record.update(self._register(context, recipe, uri, metrics))
            except Exception as exc:  # whatever MLflow raises: see the module doc
                record["error"] = f"registering in {uri} failed: {first_line(exc)}"
        if record.get("error"):
            self.log.warning("MLflow registry: %s", record["error"])
        else:
            self.log.info("MLflow registry: %s version %s (source %s)", recipe.name, record["version"],
                          record["source"])
        self.storage.write_json_atomic(f"{self.workspace}/{REGISTRY_RECORD}", record)
        return record

    def _register(self, context: Any, recipe: Recipe, uri: str, metrics: dict[str, Any]) -> dict[str, Any]:
        from posttrain.hooks.mlflow import MlflowRegistryHook

        artifact = "model" if self.storage.exists(f"{self.workspace}/model") else "adapter"
        source = f"{self.workspace}/{artifact}"
        eval_meta: dict[str, Any] = {}
        per_example = f"{self.workspace}/eval/per_example.parquet"
        if self.storage.exists(per_example):
            from posttrain.promotion_stats import read_table

            with self.storage.path(per_example).open("rb") as fh:
                eval_meta = read_table(fh)[1]
        tags = version_tags(recipe, recipe_json=self._read("recipe.json") or {},
                            manifest=self._read("data/manifest.json"), eval_meta=eval_meta,
                            run_id=context["run_id"], workspace=self.workspace, metrics=metrics,
                            provider_version=__version__)
        run_id = self.training_run_id(uri)
        version = MlflowRegistryHook(uri).register(recipe.name, source, run_id, tags)
        return {"version": str(version.version), "source": source, "run_id": run_id}

    def register_promotion(self, context: Any, recipe: Recipe, decision: dict[str, Any]) -> dict[str, Any]:
        """Tag the run's version with the decision and move the alias `champion` to it. Registers
        the version first when evaluation did not (an older evaluate task, a registry that was down)."""
        record = self._read(REGISTRY_RECORD)
        uri, _ = registry_uri(recipe)
        if record is None or record.get("error") or record.get("tracking_uri") != uri:
            metrics = self._read("eval/metrics.json") or {}
            record = self.register_evaluated(context, recipe, metrics)
        result = {k: record.get(k) for k in ("tracking_uri", "name", "version", "run_id")}
        version_url = version_link(ui_url(recipe), recipe.name, record.get("version"))
        self.push_link(context, MlflowModelVersionLink, version_url)
        self.link_training_run(context, recipe)
        if record.get("error"):
            result.update(alias_moved=False, error=record["error"])
            return result
        from posttrain.hooks.mlflow import MlflowRegistryHook

        try:
            MlflowRegistryHook(uri).promote(recipe.name, record["version"], decision_tags(decision))
            result["alias_moved"] = True
        except Exception as exc:
            result.update(alias_moved=False, error=f"moving the champion alias in {uri} failed: {first_line(exc)}")
            self.log.warning("MLflow registry: %s; the promotion stands (champion.json moved)", result["error"])
        return result

    def publish_lineage(self, context: Any, decision: dict[str, Any]) -> None:
        """The champion Asset event's extra (this task's outlets are the champion Asset)."""
        extra = asset_extra(decision, decision.get("registry") or {}, context["run_id"])
        for outlet in self.outlets or []:
            context["outlet_events"][outlet].extra = extra
