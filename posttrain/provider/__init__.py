"""Provider metadata for Airflow's `apache_airflow_provider` entry point."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-provider-posttrain",
        "name": "posttrain",
        "description": "YAML recipes → LLM post-training DAGs: data validation, packing, Ray training, "
                       "vLLM evaluation, checkpoint promotion.",
        "versions": [__version__],
        "connection-types": [
            {"connection-type": "ray", "hook-class-name": "posttrain.hooks.ray.RayJobHook"},
        ],
        "hooks": [{"integration-name": "Ray", "python-modules": ["posttrain.hooks.ray", "posttrain.hooks.local_ray"]},
                  {"integration-name": "MLflow", "python-modules": ["posttrain.hooks.mlflow"]}],
        "operators": [{"integration-name": "posttrain", "python-modules": [
            "posttrain.operators.recipe", "posttrain.operators.validate", "posttrain.operators.prepare",
            "posttrain.operators.ray_cluster", "posttrain.operators.train", "posttrain.operators.evaluate",
            "posttrain.operators.promote", "posttrain.operators.report"]}],
        "triggers": [{"integration-name": "Ray", "python-modules": ["posttrain.triggers.ray"]}],
        "extra-links": ["posttrain.links.RayDashboardLink", "posttrain.links.MlflowRunLink",
                        "posttrain.links.MlflowModelVersionLink", "posttrain.links.RunReportLink"],
    }
