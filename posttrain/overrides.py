"""Run-time overrides: the recipe fields a manual trigger may change from the Airflow UI.

Only the fields named here are overridable; anything else in a run's conf is refused, so a trigger
can't change e.g. storage or compute. Each field's type, bounds and help text are the recipe
schema's own (`Field(..., description=...)`): the UI form is built from `Recipe.model_json_schema()`,
so they are written once. Torch-free and airflow-free.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from posttrain.recipe import Recipe, RecipeError, parse_recipe

# Param name (what the trigger form shows) -> the recipe field it sets.
OVERRIDES: dict[str, str] = {
    "learning_rate": "training.learning_rate",
    "max_steps": "training.max_steps",
    "seed": "training.seed",
    "train_data": "data.train",
    "eval_data": "data.eval",
    "min_improvement": "promotion.min_improvement",
}
# JSON-schema keywords a trigger form checks a value against.
_CHECKED = ("type", "enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
            "maxLength", "pattern")


@functools.cache
def _recipe_schema() -> dict[str, Any]:
    return Recipe.model_json_schema()


def _field(path: str) -> dict[str, Any]:
    """The JSON schema of the recipe field at `path` (section references followed)."""
    root = _recipe_schema()
    node: dict[str, Any] = root
    for part in path.split("."):
        node = node["properties"][part]
        if "$ref" in node:
            node = root["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def override_schema(name: str) -> dict[str, Any]:
    """Type, bounds and description of an overridable field, as a trigger form's Param takes them.
    An optional field (`anyOf` a type and null) becomes one schema with both types."""
    path = OVERRIDES[name]
    field = _field(path)
    variants = field.get("anyOf", [field])
    schema: dict[str, Any] = {}
    types = []
    for variant in variants:
        kind = variant.get("type")
        types += kind if isinstance(kind, list) else [kind] if kind else []
        schema.update({k: v for k, v in variant.items() if k in _CHECKED and k != "type"})
    if types:
        schema["type"] = types[0] if len(types) == 1 else types
    description = field.get("description", "")
    schema["description"] = f"{description} ({path})" if description else path
    return schema


def _get(data: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        data = data[part]
    return data


def override_defaults(recipe: Recipe) -> dict[str, Any]:
    """The current value of every overridable field (the UI form's defaults)."""
    dumped = recipe.model_dump(mode="json")
    return {name: _get(dumped, path) for name, path in OVERRIDES.items()}


def apply_overrides(recipe: Recipe, overrides: dict[str, Any], source: str = "<run conf>") -> Recipe:
    """A new recipe with `overrides` applied and the whole schema checked again."""
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise RecipeError(source, [(f"params.{k}", "cannot be overridden at run time; allowed: "
                                    + ", ".join(OVERRIDES)) for k in unknown])
    data = recipe.model_dump(mode="json")
    for name, value in overrides.items():
        *parents, leaf = OVERRIDES[name].split(".")
        node = data
        for part in parents:
            node = node[part]
        node[leaf] = value
    if overrides.get("max_steps") is not None:
        data["training"]["epochs"] = None  # a step count asked for at trigger time replaces the recipe's epochs
    # Relative override paths are taken from the current working directory of the task.
    return parse_recipe(data, source, base_dir=Path.cwd())
