"""What every posttrain operator shares: the run workspace and the recipe resolved into it."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator

from posttrain.hooks.storage import StorageHook
from posttrain.recipe import Recipe
from posttrain.uris import local_path


class PosttrainOperator(BaseOperator):
    """Base of the stage operators. `workspace` is the run workspace URI (templated; the DAG
    passes the resolve_recipe task's output)."""

    template_fields: tuple[str, ...] = ("workspace",)
    ui_color = "#e8f0fe"

    def __init__(self, *, workspace: str, storage_conn_id: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.workspace = workspace
        self.storage_conn_id = storage_conn_id

    @cached_property
    def storage(self) -> StorageHook:
        return StorageHook(self.storage_conn_id)

    def load_recipe(self) -> Recipe:
        return Recipe.model_validate(self.storage.read_json(f"{self.workspace}/recipe.json"))

    def lineage(self, recipe: Recipe) -> tuple[list[str], list[str]]:
        """(URIs read, URIs written) for OpenLineage; the stages that move data override it."""
        return [], []

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """Called by the OpenLineage provider's listener after the task succeeded (operators/lineage.py)."""
        from posttrain.operators.lineage import operator_lineage

        return operator_lineage(*self.lineage(self.load_recipe()))

    def local_workspace(self) -> Path:
        """The workspace as a local folder, for stages that work on its files in this process (they
        need a file:// workspace)."""
        if "://" in self.workspace and not self.workspace.startswith("file://"):
            raise ValueError(f"{self.task_id} needs a file:// workspace, got {self.workspace}")
        return local_path(self.workspace)
