"""The run parameters a manual trigger may set in the Airflow UI: typed, bounded and described as
the recipe schema says (posttrain.overrides), defaulting to the recipe's values."""

from __future__ import annotations

from airflow.sdk import Param

from posttrain.overrides import OVERRIDES, override_defaults, override_schema
from posttrain.recipe import Recipe


def recipe_params(recipe: Recipe) -> dict[str, Param]:
    defaults = override_defaults(recipe)
    return {name: Param(defaults[name], **override_schema(name)) for name in OVERRIDES}
