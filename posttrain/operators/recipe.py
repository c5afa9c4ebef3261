"""The first task of every recipe DAG: merge the run's parameters into the recipe, check the result
against the schema, and write it to the run workspace, where every later task reads it."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator

from posttrain.hooks.storage import StorageHook
from posttrain.overrides import OVERRIDES, apply_overrides, override_defaults
from posttrain.paths import run_workspace
from posttrain.planning import check_plan
from posttrain.recipe import load_recipe


class ResolveRecipeOperator(BaseOperator):
    template_fields = ("recipe_path",)
    ui_color = "#fef7e0"

    def __init__(self, *, recipe_path: str, storage_conn_id: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.recipe_path = recipe_path
        self.storage_conn_id = storage_conn_id

    def execute(self, context: Any) -> dict[str, Any]:
        recipe = load_recipe(self.recipe_path)
        conf = dict(context["dag_run"].conf or {})
        params = {k: v for k, v in context["params"].items() if k in OVERRIDES}
        # Keys in the run conf that are no parameter of this DAG are refused by apply_overrides.
        requested = {**params, **{k: v for k, v in conf.items() if k not in OVERRIDES}}
        defaults = override_defaults(recipe)
        changed = {k: v for k, v in requested.items() if k not in defaults or v != defaults[k]}
        resolved = apply_overrides(recipe, changed, source=f"{self.recipe_path} (run parameters)")
        # An impossible parallel plan or a model over the memory budget fails here, before a
        # cluster is started or anything is written (pure Python: reads the model's config.json).
        storage = StorageHook(self.storage_conn_id)
        plan = check_plan(resolved, source=self.recipe_path,
                          models=lambda uri: storage.path(uri).fs)  # an s3:// model: config.json alone
        if plan["checked"]:
            self.log.info("plan: %s on %d workers (tp %d), about %.3f GiB per device", plan["strategy"],
                          plan["world_size"], plan["tensor_parallel"], plan["total_gib_per_device"])
        else:
            self.log.warning("plan not checked before the cluster starts (tensor-parallel degree, memory per "
                             "device): %s", plan["reason"])
        workspace = run_workspace(resolved.storage.root, resolved.name, context["run_id"])
        storage.write_json_atomic(f"{workspace}/recipe.json", resolved.model_dump(mode="json"))
        self.log.info("run workspace %s; overrides %s", workspace, changed or "none")
        context["ti"].xcom_push(key="workspace", value=workspace)  # what every later task reads
        return {"workspace": workspace, "overrides": changed}
