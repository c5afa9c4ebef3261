"""Validate a recipe's data files with the built-in suite for their format."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from posttrain.recipe import Recipe
from posttrain.validation.frames import build_frames
from posttrain.validation.report import split_report
from posttrain.validation.suites import run_suite


def validate_recipe_data(recipe: Recipe, open_lines: Callable[[str], Iterable[bytes]]) -> dict[str, Any]:
    """`open_lines(uri)` yields the raw lines of a file (streamed, whatever the storage)."""
    splits = {"train": recipe.data.train, **({"eval": recipe.data.eval} if recipe.data.eval else {})}
    reports = {}
    for split, uri in splits.items():
        frames = build_frames(open_lines(uri), recipe.data.format)
        # The row minimum applies to training data; an eval set is judged on its rows' shape only.
        min_rows = recipe.data.validation.min_rows if split == "train" else 1
        results = run_suite(frames, recipe.data.format, recipe.data.validation, min_rows, f"{recipe.name}-{split}")
        reports[split] = split_report(uri, frames, results)
    return {"recipe": recipe.name, "splits": reports, "success": all(r["success"] for r in reports.values())}
