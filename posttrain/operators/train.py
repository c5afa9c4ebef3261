"""train: the recipe's training loop as a Ray job on the run's cluster."""

from __future__ import annotations

from typing import Any

from posttrain.links import MlflowRunLink, RayDashboardLink
from posttrain.operators.ray_job import RayJobOperator
from posttrain.operators.registry import ModelRegistryMixin


class TrainOperator(ModelRegistryMixin, RayJobOperator):
    stage = "train"
    ui_color = "#f3e8fd"
    operator_extra_links = (RayDashboardLink(), MlflowRunLink())

    def lineage(self, recipe: Any) -> tuple[list[str], list[str]]:
        teacher = recipe.kd.teacher if recipe.kd is not None else None
        exported = "model" if self.storage.exists(f"{self.workspace}/model") else "adapter"
        return [f"{self.workspace}/data", recipe.model.base, teacher], [f"{self.workspace}/{exported}"]

    def result(self, context: Any) -> dict[str, Any]:
        summary = self.storage.read_json(f"{self.workspace}/train/summary.json")
        self.link_training_run(context, self.load_recipe())
        return {"model": f"{self.workspace}/model", **{k: summary[k] for k in ("steps", "first_loss", "last_loss")}}
