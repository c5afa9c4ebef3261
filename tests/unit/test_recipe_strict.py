"""A recipe means exactly what it says: nothing YAML or pydantic would silently reinterpret gets
through, and every refusal is one `file: field.path: message` line per problem, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.recipe import RecipeError, load_recipe
from tests.conftest import REPO, SAMPLE_DATA, TINY

# A valid recipe as YAML text; each case edits one line of it.
BASE = f"""\
name: strict
model:
  base: {TINY}
data:
  train: {SAMPLE_DATA / "train.jsonl"}
  eval: {SAMPLE_DATA / "eval.jsonl"}
  max_seq_len: 256
training:
  max_steps: 4
  learning_rate: 3.0e-3
  activation_checkpointing: auto
promotion:
  min_improvement: 0
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "strict.yaml"
    path.write_text(text)
    return path


def refused(tmp_path: Path, text: str) -> list[tuple[str, str]]:
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert all(line.startswith(f"{path}: ") for line in str(info.value).splitlines()), str(info.value)
    return info.value.errors


def test_the_base_recipe_is_valid(tmp_path: Path) -> None:
    recipe = load_recipe(write(tmp_path, BASE))
    assert recipe.training.max_steps == 4 and recipe.promotion.min_improvement == 0.0


def test_exponents_without_a_point_are_numbers(tmp_path: Path) -> None:
    """YAML 1.1 reads `1e-5` as a string; the recipe reads it as the number everyone means."""
    recipe = load_recipe(write(tmp_path, BASE.replace("learning_rate: 3.0e-3", "learning_rate: 1e-5")))
    assert recipe.training.learning_rate == 1e-5


@pytest.mark.parametrize(("text", "where", "message"), [
    (BASE + "training:\n  max_steps: 9\n", "training", "key 'training' is given twice (lines 8 and 14)"),
    (BASE.replace("  max_steps: 4\n", "  max_steps: 4\n  max_steps: 5\n"), "training.max_steps",
     "key 'max_steps' is given twice (lines 9 and 10)"),
    (BASE + "paradigm: grpo\ngrpo:\n  rewards:\n    - name: regex\n      name: exact_match\n",
     "grpo.rewards.0.name", "key 'name' is given twice (lines 17 and 18)"),
])
def test_a_key_given_twice_names_the_key_and_both_lines(tmp_path: Path, text: str, where: str, message: str) -> None:
    assert (where, message) in refused(tmp_path, text)


@pytest.mark.parametrize(("old", "new", "field", "message"), [
    ("max_steps: 4", "max_steps: true", "training.max_steps", "Input should be a valid integer"),
    ("max_steps: 4", "max_steps: 1.5", "training.max_steps", "Input should be a valid integer"),
    ("max_steps: 4", "max_steps: 4.0", "training.max_steps", "Input should be a valid integer"),
    ("max_steps: 4", 'max_steps: "4"', "training.max_steps", "Input should be a valid integer"),
    ("learning_rate: 3.0e-3", 'learning_rate: "0.003"', "training.learning_rate", "Input should be a valid number"),
    ("learning_rate: 3.0e-3", "learning_rate: .nan", "training.learning_rate", "Input should be a finite number"),
    ("min_improvement: 0", "min_improvement: .inf", "promotion.min_improvement", "Input should be a finite number"),
    ("max_seq_len: 256", "max_seq_len: yes", "data.max_seq_len", "Input should be a valid integer"),
    ("activation_checkpointing: auto", "activation_checkpointing: 1", "training.activation_checkpointing",
     "Input should be"),
])
def test_types_are_strict_and_numbers_finite(tmp_path: Path, old: str, new: str, field: str, message: str) -> None:
    assert old in BASE
    errors = refused(tmp_path, BASE.replace(old, new))
    assert any(loc.startswith(field) and message in msg for loc, msg in errors), errors


@pytest.mark.parametrize(("old", "new", "field"), [
    (f"base: {TINY}", "base: '   '", "model.base"),
    (f"train: {SAMPLE_DATA / 'train.jsonl'}", "train: ''", "data.train"),
    (f"eval: {SAMPLE_DATA / 'eval.jsonl'}", "eval: ' '", "data.eval"),
    ("name: strict", "name: strict\nowner: '  '", "owner"),
    ("name: strict", "name: strict\nstorage:\n  root: '\t'", "storage.root"),
])
def test_blank_strings_are_refused(tmp_path: Path, old: str, new: str, field: str) -> None:
    errors = refused(tmp_path, BASE.replace(old, new))
    assert any(loc == field and ("empty or only whitespace" in msg or "at least 1 character" in msg)
               for loc, msg in errors), errors


def test_a_blank_reward_name_is_refused(tmp_path: Path) -> None:
    text = BASE.replace("name: strict", "name: strict\nparadigm: grpo").replace(
        "train:", "format: prompt\n  train:") + "grpo:\n  rewards:\n    - name: '  '\n      weight: 1\n"
    errors = refused(tmp_path, text)
    assert ("grpo.rewards.0.name", "must not be empty or only whitespace") in errors, errors


def test_the_cli_reports_without_a_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, BASE.replace("max_steps: 4", "max_steps: 4\n  max_steps: true"))
    result = subprocess.run([sys.executable, "-m", "posttrain", "validate", str(path)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f"{path}: training.max_steps: key 'max_steps' is given twice (lines 9 and 10)"
    assert "Traceback" not in result.stderr
