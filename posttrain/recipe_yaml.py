"""Reading a recipe's YAML so that it means what it says.

- A key given twice in one mapping, at any depth, is an error naming the key and both lines (plain
  YAML keeps the last one silently).
- Floats are read as YAML 1.2 does: `1e-5` is a number (YAML 1.1 makes it the string "1e-5", which
  the strict schema would then refuse). Quoted values stay strings.
libyaml's loader when present: the DAG processor parses every recipe on every pass.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_BASE = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class RecipeLoader(_BASE):  # type: ignore[misc, valid-type]
    pass


# An exponent without a decimal point (1e-5, 2E3): a float in YAML 1.2, a string in YAML 1.1.
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                   list("-+0123456789"))


class YamlProblem(ValueError):
    """Problems as (where, message): a field path, or `line N` for text that isn't YAML."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{where}: {msg}" for where, msg in problems))


def _duplicate_keys(node: yaml.Node, path: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
            line = key_node.start_mark.line + 1
            if key in first_line:
                found.append((".".join((*path, key)),
                              f"key {key!r} is given twice (lines {first_line[key]} and {line})"))
            else:
                first_line[key] = line
            found += _duplicate_keys(value_node, (*path, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found += _duplicate_keys(item, (*path, str(i)))
    return found


def load_yaml(text: str) -> Any:
    """The document in `text`; raises YamlProblem for text that isn't YAML or repeats a key."""
    try:
        node = yaml.compose(text, Loader=RecipeLoader)
        duplicates = _duplicate_keys(node) if node is not None else []
        if duplicates:
            raise YamlProblem(duplicates)
        return yaml.load(text, Loader=RecipeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "(yaml)"
        raise YamlProblem([(where, str(getattr(exc, "problem", exc)))]) from None
