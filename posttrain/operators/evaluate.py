"""evaluate: vLLM generation and eval loss of the exported model, as a Ray job; then the model is
registered as an MLflow model version (posttrain/operators/registry.py)."""

from __future__ import annotations

from typing import Any

from posttrain.operators.ray_job import RayJobOperator
from posttrain.operators.registry import ModelRegistryMixin


class EvaluateOperator(ModelRegistryMixin, RayJobOperator):
    stage = "evaluate"
    ui_color = "#e8f0fe"

    def lineage(self, recipe: Any) -> tuple[list[str], list[str]]:
        exported = "model" if self.storage.exists(f"{self.workspace}/model") else "adapter"
        return [f"{self.workspace}/{exported}", recipe.data.eval], [f"{self.workspace}/eval"]

    def result(self, context: Any) -> dict[str, Any]:
        metrics = self.storage.read_json(f"{self.workspace}/eval/metrics.json")
        self.register_evaluated(context, self.load_recipe(), metrics)
        return metrics
