"""train: the recipe's training loop as a Ray job on the run's cluster."""

from __future__ import annotations

from typing import Any

from posttrain.operators.ray_job import RayJobOperator


class TrainOperator(RayJobOperator):
    stage = "train"
    ui_color = "#f3e8fd"

    def result(self, context: Any) -> dict[str, Any]:
        summary = self.storage.read_json(f"{self.workspace}/train/summary.json")
        return {"model": f"{self.workspace}/model", **{k: summary[k] for k in ("steps", "first_loss", "last_loss")}}
