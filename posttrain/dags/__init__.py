"""Recipe files → Airflow DAGs (see factory)."""

from posttrain.dags.factory import build_dag, load_recipe_dags

__all__ = ["build_dag", "load_recipe_dags"]
