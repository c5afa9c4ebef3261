"""Recipe files → Airflow DAGs, one `posttrain__<name>` DAG per recipe.

Parsing imports only airflow.sdk, pydantic, yaml and the thin operator modules; torch, ray,
transformers, vllm and great_expectations are imported inside the tasks that need them.
"""

from __future__ import annotations

import operator
from datetime import datetime
from functools import reduce
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Asset

from posttrain.dags.params import recipe_params
from posttrain.operators.approval import PromotionApprovalOperator
from posttrain.operators.evaluate import EvaluateOperator
from posttrain.operators.prepare import PrepareDataOperator, RayPrepareDataOperator
from posttrain.operators.promote import PromoteOperator
from posttrain.operators.ray_cluster import RayClusterOperator, RayClusterTeardownOperator
from posttrain.operators.recipe import ResolveRecipeOperator
from posttrain.operators.report import ReportOperator
from posttrain.operators.train import TrainOperator
from posttrain.operators.validate import ValidateDataOperator
from posttrain.recipe import Recipe, RecipeError, load_recipe

RECIPE_SUFFIXES = (".yaml", ".yml")


def champion_asset(recipe: Recipe) -> Asset:
    return Asset(name=f"posttrain/{recipe.name}/champion", uri=recipe.champion_uri)


def build_dag(recipe: Recipe, recipe_path: str | Path) -> DAG:
    schedule: Any = recipe.schedule
    if recipe.trigger_on_assets:
        # Any one of the assets updated starts a run (a plain list would wait for all of them).
        schedule = reduce(operator.or_, [Asset(uri) for uri in recipe.trigger_on_assets])
    with DAG(
        dag_id=recipe.dag_id,
        description=recipe.description or f"posttrain {recipe.paradigm} recipe {recipe.name}",
        schedule=schedule,
        start_date=datetime(2024, 1, 1),
        catchup=False,
        max_active_runs=1,
        tags=["posttrain", recipe.paradigm, *recipe.tags],
        default_args={"owner": recipe.owner},
        doc_md=f"Generated from `{recipe_path}`.",
        auto_register=False,  # only returned DAGs count: a recipe that fails half way leaves none behind
    ) as dag:
        conn = recipe.storage.conn_id
        resolve = ResolveRecipeOperator(task_id="resolve_recipe", recipe_path=str(recipe_path), storage_conn_id=conn)
        ws = resolve.output["workspace"]
        validate = ValidateDataOperator(task_id="validate_data", workspace=ws, storage_conn_id=conn)
        cluster = RayClusterOperator(task_id="ray_cluster", workspace=ws, storage_conn_id=conn)
        # Deferrable per the recipe, else per `operators.default_deferrable` (the compose file and
        # `posttrain run` set it).
        waiting = {"deferrable": recipe.airflow.deferrable, "timeout_s": recipe.airflow.job_timeout_s,
                   "retry_window_s": recipe.airflow.dashboard_retry_window_s}
        if recipe.data.prepare == "ray":  # a Ray Data job on the run's cluster, which starts first
            prepare: Any = RayPrepareDataOperator(task_id="prepare_data", workspace=ws, cluster=cluster.output,
                                                  storage_conn_id=conn, **waiting)
        else:
            prepare = PrepareDataOperator(task_id="prepare_data", workspace=ws, storage_conn_id=conn)
        train = TrainOperator(task_id="train", workspace=ws, cluster=cluster.output, storage_conn_id=conn, **waiting)
        evaluate = EvaluateOperator(task_id="evaluate", workspace=ws, cluster=cluster.output, storage_conn_id=conn,
                                    **waiting)
        promote = PromoteOperator(task_id="promote", workspace=ws, storage_conn_id=conn,
                                  outlets=[champion_asset(recipe)])
        teardown = RayClusterTeardownOperator(task_id="ray_cluster_teardown", workspace=ws, cluster=cluster.output,
                                              storage_conn_id=conn)
        # Validation comes before any cluster is provisioned, either way.
        before_train = [validate, cluster, prepare] if recipe.data.prepare == "ray" else [validate, prepare, cluster]
        if recipe.promotion.approval == "required":  # a person approves first; the cluster goes meanwhile
            gate = PromotionApprovalOperator(task_id="approve_promotion", workspace=ws, storage_conn_id=conn,
                                             approval_timeout_s=recipe.promotion.approval_timeout)
            reduce(operator.rshift, before_train) >> train >> evaluate >> [gate, teardown]
            gate >> promote
        else:
            reduce(operator.rshift, before_train) >> train >> evaluate >> [promote, teardown]
        # A teardown that fails (a head left running) fails the run, so nobody misses a leak.
        teardown.as_teardown(setups=cluster, on_failure_fail_dagrun=True)
        # The run report, last, whatever happened: a teardown without setups runs once everything before
        # it is done (as trigger_rule all_done would) but leaves the run's state to the tasks before it.
        report = ReportOperator(task_id="report", workspace=ws, storage_conn_id=conn)
        [promote, teardown] >> report
        report.as_teardown()
    # Params are attached after the tasks exist: every operator would otherwise deep-copy them at
    # construction (most of the DAG's parse time), and at run time Airflow merges the DAG's params
    # into each task's context anyway.
    dag.params.update(recipe_params(recipe))
    return dag


class InvalidRecipeDAG(DAG):
    """Stands in for a recipe that doesn't validate: Airflow's DAG check calls validate(), which
    raises, so the recipe shows up as an import error and every other recipe still loads."""

    def validate(self) -> None:
        raise ValueError("invalid posttrain recipe(s):\n" + (self.description or ""))


def load_recipe_dags(recipes_dir: str | Path, only: str | None = None) -> dict[str, DAG]:
    """One DAG per recipe file in `recipes_dir` (or just the file named `only`), keyed for a dags
    file's globals()."""
    dags: dict[str, DAG] = {}
    errors: list[str] = []
    for path in sorted(Path(recipes_dir).iterdir()):
        if path.suffix not in RECIPE_SUFFIXES or (only is not None and path.name != only):
            continue
        try:
            recipe = load_recipe(path, import_user_code=False)  # no user reward modules at parse time
            dags[recipe.dag_id] = build_dag(recipe, path)
        except RecipeError as exc:
            errors.append(str(exc))
        except Exception as exc:  # e.g. a schedule Airflow itself rejects
            errors.append(f"{path}: {type(exc).__name__}: {exc}")
    if errors:
        # Airflow keys import errors by the Python file; one stand-in carries every bad recipe.
        dags["posttrain__invalid_recipes"] = InvalidRecipeDAG(
            dag_id="posttrain__invalid_recipes", schedule=None, description="\n".join(errors))
    return dags
