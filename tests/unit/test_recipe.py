"""The recipe schema: every error names the file and the field path, and bad values never pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain.overrides import apply_overrides, override_defaults
from posttrain.recipe import RecipeError, load_recipe
from tests.conftest import REPO, write_recipe


def errors_of(path: Path) -> list[tuple[str, str]]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    return info.value.errors


def test_example_recipe_is_valid_and_resolves_relative_paths() -> None:
    recipe = load_recipe(REPO / "dags" / "recipes" / "tiny-sft.yaml")
    assert recipe.dag_id == "posttrain__tiny-sft"
    assert recipe.data.train == f"file://{REPO}/dags/data/tiny-chat/train.jsonl"
    assert recipe.storage.root.startswith("file://") and recipe.storage.root.endswith("/.posttrain/storage")


@pytest.mark.parametrize(("sections", "field", "message"), [
    ({"unknown_key": 1}, "unknown_key", "unknown field"),
    ({"training": {"max_steps": 4, "learning_rat": 0.1}}, "training.learning_rat", "unknown field"),
    ({"data": {"train": "a.jsonl", "eval": "b.jsonl", "max_seq_len": 0}}, "data.max_seq_len", "greater than 0"),
    ({"compute": {"workers": 0}}, "compute.workers", "greater than or equal to 1"),
    ({"model": {"base": "m", "lora": {"rank": 0}}}, "model.lora.rank", "greater than 0"),
    ({"paradigm": "grpo", "data": {"format": "prompt"}}, "(recipe)", "paradigm 'grpo' needs its section 'grpo'"),
    ({"paradigm": "grpo", "data": {"format": "prompt"}, "grpo": {"rewards": [{"name": "nope"}]}}, "grpo.rewards.0",
     "reward 'nope'"),
    ({"paradigm": "grpo", "data": {"format": "prompt"}, "grpo": {"rewards": [
        {"name": "regex", "params": {"pattern": "(unclosed"}}]}}, "grpo.rewards.0", "reward 'regex'"),
    ({"paradigm": "grpo", "data": {"format": "prompt"}, "grpo": {"rewards": [
        {"name": "regex", "params": {"pattern": "a"}}, {"name": "regex", "params": {"pattern": "b"}}]}},
     "grpo", "reward keys must be unique"),
    ({"paradigm": "kd"}, "(recipe)", "paradigm 'kd' needs its section 'kd'"),
    ({"paradigm": "kd", "kd": {"teacher": "t", "divergence": "kl"}}, "kd.divergence", "'kl' is not allowed"),
    ({"paradigm": "dpo"}, "(recipe)", "paradigm 'dpo' needs data.format 'preference', got 'chat'"),
    ({"dpo": {"beta": 0.1}}, "(recipe)", "section 'dpo' is for paradigm 'dpo'; this recipe's paradigm is 'sft'"),
    ({"paradigm": "dpo", "data": {"format": "preference"}, "dpo": {"reference": "on_the_fly"}}, "(recipe)",
     "needs model.lora; without LoRA use 'precomputed'"),
    ({"paradigm": "dpo", "data": {"format": "preference"}, "dpo": {"beta": 0}}, "dpo.beta", "greater than 0"),
    ({"evaluation": {"metrics": ["preference_accuracy"]}}, "(recipe)",
     "evaluation.metrics ['preference_accuracy'] are not measured for paradigm 'sft'; allowed: "
     "['eval_loss', 'exact_match']"),
    ({"paradigm": "ppo"}, "paradigm", "allowed"),
    ({"training": {"precision": "fp8"}}, "training.precision", "'fp8' is not allowed"),
    ({"compute": {"provider": "ec2"}}, "compute", "compute.ec2 is required with provider 'ec2'"),
    ({"compute": {"provider": "ec2", "gpus_per_worker": 1, "ec2": {
        "region": "us-east-1", "worker_instance_type": "g5.xlarge", "worker_nodes": 1, "ami": "ami-0123456789abcdef0",
        "subnet_id": "subnet-0123456789abcdef0", "security_group_ids": ["sg-0123456789abcdef0"],
        "iam_instance_profile": "p", "image": "img:1"}}},
     "compute", "2 workers × 1 GPUs need 2 GPUs; 1 × g5.xlarge have 1"),
    ({"compute": {"provider": "ec2", "ec2": {"region": "us-east-1", "worker_instance_type": "g5 xlarge"}}},
     "compute.ec2.worker_instance_type", "is not an EC2 instance type"),
    ({"schedule": "every tuesday"}, "schedule", "neither a cron expression"),
    ({"promotion": {"metric": "bleu"}}, "(recipe)", "promotion.metric 'bleu' is not produced by evaluation"),
    ({"schedule": "@daily", "trigger_on_assets": ["s3://b/x"]}, "(recipe)", "exclusive"),
    ({"name": "Has Spaces"}, "name", "should match pattern"),
    ({"storage": {"root": "gs://bucket"}}, "storage.root", "not supported"),
    ({"model": {"base": "m", "components": {"head": "not a path"}}}, "model.components.head", "import path"),
    ({"promotion": {"approval": "maybe"}}, "promotion.approval", "'none' or 'required'"),
    ({"promotion": {"approval_timeout": 0}}, "promotion.approval_timeout", "greater than or equal to 1"),
    ({"training": {"max_steps": 4, "epochs": 2}}, "training", "set max_steps or epochs, not both"),
])
def test_schema_errors_name_the_field(tmp_path: Path, sections: dict, field: str, message: str) -> None:
    path = write_recipe(tmp_path, **sections)
    errors = errors_of(path)
    assert any(loc == field and message in msg for loc, msg in errors), errors


def test_each_paradigm_gets_its_metrics_and_promotion_defaults(tmp_path: Path) -> None:
    from posttrain.recipe import load_recipe

    sft = load_recipe(write_recipe(tmp_path / "sft"))
    assert (sft.evaluation.metrics, sft.promotion.metric, sft.promotion.mode) == (
        ["eval_loss", "exact_match"], "eval_loss", "min")
    dpo = load_recipe(write_recipe(tmp_path / "dpo", paradigm="dpo", data={"format": "preference"}))
    assert dpo.dpo is not None and (dpo.dpo.beta, dpo.dpo.loss, dpo.dpo.reference) == (0.1, "sigmoid", "precomputed")
    assert (dpo.promotion.metric, dpo.promotion.mode) == ("preference_accuracy", "max")
    loss = load_recipe(write_recipe(tmp_path / "dpo-loss", paradigm="dpo", data={"format": "preference"},
                                    promotion={"metric": "dpo_loss"}))
    assert loss.promotion.mode == "min"


def test_user_reward_modules_are_imported_at_load_but_not_at_dag_parse(tmp_path: Path) -> None:
    from posttrain.recipe import RecipeError, load_recipe

    path = write_recipe(tmp_path, paradigm="grpo", data={"format": "prompt"},
                        grpo={"rewards": [{"name": "team_rewards.not_installed:score"}]})
    with pytest.raises(RecipeError, match="team_rewards.not_installed"):
        load_recipe(path)
    assert load_recipe(path, import_user_code=False).grpo.rewards[0].name == "team_rewards.not_installed:score"
    bad = write_recipe(tmp_path / "bad", paradigm="grpo", data={"format": "prompt"},
                       grpo={"rewards": [{"name": "not a path:x y"}]})
    with pytest.raises(RecipeError, match="not an import path"):
        load_recipe(bad, import_user_code=False)


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, training={"learning_rate": -1, "micro_batch_size": 0}, compute={"workers": 0})
    fields = {loc for loc, _ in errors_of(path)}
    assert {"training.learning_rate", "training.micro_batch_size", "compute.workers"} <= fields


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodel: {base: m\ndata: []\n")
    [(where, _msg)] = errors_of(path)
    assert where.startswith("line ")


def test_cli_validate_prints_file_field_message_and_fails(tmp_path: Path) -> None:
    good = write_recipe(tmp_path / "good")
    bad = write_recipe(tmp_path / "bad", compute={"workers": 0}, training={"max_steps": 0})
    proc = subprocess.run([sys.executable, "-m", "posttrain", "validate", str(good), str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert f"{good}: ok" in proc.stdout
    assert f"{bad}: compute.workers: Input should be greater than or equal to 1" in proc.stderr
    assert f"{bad}: training.max_steps:" in proc.stderr


def test_overrides_are_whitelisted_and_revalidated(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path))
    assert override_defaults(recipe)["max_steps"] == 4
    changed = apply_overrides(recipe, {"learning_rate": 0.01, "max_steps": 9})
    assert (changed.training.learning_rate, changed.training.max_steps) == (0.01, 9)
    assert recipe.training.max_steps == 4  # the original is untouched
    with pytest.raises(RecipeError, match=r"params.storage_root: cannot be overridden at run time; allowed: "):
        apply_overrides(recipe, {"storage_root": "file:///elsewhere"})
    with pytest.raises(RecipeError, match=r"training.learning_rate: Input should be greater than 0"):
        apply_overrides(recipe, {"learning_rate": 0})
    with pytest.raises(RecipeError, match=r"data.eval is required"):
        apply_overrides(recipe, {"eval_data": None})


def test_epochs_replace_the_default_step_count_and_an_overridden_step_count_replaces_them(tmp_path: Path) -> None:
    from posttrain.recipe import Recipe

    path = write_recipe(tmp_path)
    data = yaml.safe_load(path.read_text())
    del data["training"]["max_steps"]
    data["training"]["epochs"] = 3
    path.write_text(yaml.safe_dump(data))
    recipe = load_recipe(path)
    assert (recipe.training.max_steps, recipe.training.epochs) == (None, 3)
    # What the workers read back (recipe.json) means the same.
    assert Recipe.model_validate(recipe.model_dump(mode="json")).training.epochs == 3
    assert override_defaults(recipe)["max_steps"] is None
    assert apply_overrides(recipe, {"max_steps": None}).training.epochs == 3  # the form's untouched default
    steps = apply_overrides(recipe, {"max_steps": 7}).training
    assert (steps.max_steps, steps.epochs) == (7, None)


def test_schema_round_trips_through_json(tmp_path: Path) -> None:
    from posttrain.recipe import Recipe

    recipe = load_recipe(write_recipe(tmp_path, model={"base": "m", "lora": {"rank": 4}}))
    again = Recipe.model_validate(yaml.safe_load(recipe.model_dump_json()))
    assert again == recipe
