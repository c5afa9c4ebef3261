"""Airflow DAGs for every posttrain recipe in ./recipes (one DAG per YAML file).

Drop this file and a recipes/ folder into an Airflow dags folder. A recipe that does not validate
appears as an import error naming its file and field; the others still load.
"""

from pathlib import Path

from posttrain.dags import load_recipe_dags

globals().update(load_recipe_dags(Path(__file__).parent / "recipes"))
