"""The run parameters a manual trigger may set in the Airflow UI (typed, bounded, defaulting to the
recipe), built from the whitelist in posttrain.recipe.OVERRIDES."""

from __future__ import annotations

from airflow.sdk import Param

from posttrain.recipe import OVERRIDES, Recipe, override_defaults

DESCRIPTIONS = {
    "learning_rate": "Peak learning rate (training.learning_rate)",
    "max_steps": "Optimizer steps to train (training.max_steps)",
    "seed": "Random seed (training.seed)",
    "train_data": "Training data URI (data.train)",
    "eval_data": "Evaluation data URI (data.eval)",
    "min_improvement": "Margin by which the challenger must beat the champion (promotion.min_improvement)",
}


def recipe_params(recipe: Recipe) -> dict[str, Param]:
    defaults = override_defaults(recipe)
    return {name: Param(defaults[name], description=DESCRIPTIONS[name], **schema)
            for name, (_path, schema) in OVERRIDES.items()}
