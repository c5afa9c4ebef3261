"""Import what a recipe names as 'package.module:attr' (a reward function, a model component),
with errors that say which part failed. Torch-free and airflow-free."""

from __future__ import annotations

import importlib
from typing import Any


def import_object(module_name: str, attr_path: str, label: str) -> Any:
    """`module_name`'s attribute `attr_path` (may be dotted: `Class.method`); raises ValueError
    starting with `label` (what the recipe called it) when the module or the attribute is missing
    or the module fails while importing."""
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = f"module {exc.name!r} not found" if exc.name else str(exc)
        raise ValueError(f"{label}: cannot import {module_name!r}: {missing}") from exc
    except Exception as exc:  # the user's module failed while importing: say how
        raise ValueError(f"{label}: importing {module_name!r} raised {type(exc).__name__}: {exc}") from exc
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{label}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, part)
    return obj
