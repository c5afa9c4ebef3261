"""Great Expectations' built-in chat suite on a corpus of bad files: each fails with the rule it
breaks and the line numbers of example rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.recipe import load_recipe
from posttrain.uris import local_path
from posttrain.validation.report import summary
from posttrain.validation.run import validate_recipe_data
from tests.conftest import SAMPLE_DATA, write_recipe

GOOD = {"messages": [{"role": "user", "content": "What is 1 plus 1?"}, {"role": "assistant", "content": "2"}]}


def line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def good_lines(n: int) -> bytes:
    return b"".join(line({"messages": [{"role": "user", "content": f"q{i}"},
                                       {"role": "assistant", "content": f"a{i}"}]}) for i in range(n))


CORPUS = {
    "content-not-a-string": (good_lines(3) + line({"messages": [{"role": "user", "content": 7},
                                                                {"role": "assistant", "content": "x"}]}),
                             "content is a string", [4]),
    "missing-messages": (good_lines(2) + line({"conversation": []}), "messages is a non-empty list", [3]),
    "empty-content": (line({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]})
                      + good_lines(2), "content is not empty", [1]),
    "unknown-role": (good_lines(1) + line({"messages": [{"role": "tool", "content": "q"},
                                                        {"role": "assistant", "content": "a"}]}),
                     "roles are system, user, assistant", [2]),
    "missing-role": (good_lines(1) + line({"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]}),
                     "roles are system, user, assistant", [2]),
    "wrong-role-order": (good_lines(2) + line({"messages": [{"role": "assistant", "content": "hello"},
                                                            {"role": "user", "content": "q"},
                                                            {"role": "assistant", "content": "a"}]}),
                         "turns alternate user/assistant after an optional system prompt", [3]),
    "ends-with-user": (good_lines(2) + line({"messages": [{"role": "user", "content": "q"}]}),
                       "last turn is from the assistant", [3]),
    "duplicates": (good_lines(3) + line(GOOD) + line(GOOD) + line(GOOD),
                   "duplicate examples within max_duplicate_fraction", [5, 6]),
    "too-few-rows": (good_lines(2), "at least min_rows examples", []),
}


@pytest.fixture(scope="module")
def recipe_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("validation")


def validate(recipe_dir: Path, name: str, content: bytes, min_rows: int = 2) -> dict:
    data = recipe_dir / f"{name}.jsonl"
    data.write_bytes(content)
    recipe = load_recipe(write_recipe(recipe_dir, name=name, data={"train": str(data), "validation": {
        "min_rows": min_rows, "max_duplicate_fraction": 0.1}}))

    def open_lines(uri: str):
        with local_path(uri).open("rb") as fh:
            yield from fh

    return validate_recipe_data(recipe, open_lines)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_each_bad_file_fails_its_rule_with_example_lines(recipe_dir: Path, name: str) -> None:
    content, rule, lines = CORPUS[name]
    report = validate(recipe_dir, name, content, min_rows=5 if name == "too-few-rows" else 2)
    assert not report["success"]
    failed = {r["rule"]: r["example_lines"] for r in report["splits"]["train"]["rules"] if not r["success"]}
    assert failed == {rule: lines}
    assert f"rule '{rule}' failed" in summary(report)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("not-utf8", good_lines(2) + b'{"messages": "\xff\xfe"}\n', "line 3: not UTF-8"),
    ("truncated-last-line", good_lines(2) + b'{"messages": [{"role": "user", "con', "line 3: not JSON"),
    ("not-an-object", good_lines(2) + b"[1, 2]\n", "line 3: expected a JSON object, got list"),
])
def test_unreadable_lines_are_named(recipe_dir: Path, name: str, content: bytes, message: str) -> None:
    report = validate(recipe_dir, name, content)
    assert not report["success"] and message in summary(report)
    assert report["splits"]["train"]["rows"] == 2  # the readable rows were still checked


def test_the_sample_data_passes(recipe_dir: Path) -> None:
    report = validate(recipe_dir, "sample", (SAMPLE_DATA / "train.jsonl").read_bytes(), min_rows=100)
    assert report["success"], summary(report)
