"""evaluate: vLLM generation and eval loss of the exported model, as a Ray job."""

from __future__ import annotations

from typing import Any

from posttrain.operators.ray_job import RayJobOperator


class EvaluateOperator(RayJobOperator):
    stage = "evaluate"
    ui_color = "#e8f0fe"

    def result(self, context: Any) -> dict[str, Any]:
        return self.storage.read_json(f"{self.workspace}/eval/metrics.json")
