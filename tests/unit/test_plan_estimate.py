"""`posttrain plan`: the parameter counts are the model's, sharding divides what it should, and a
plan that doesn't fit the memory budget is refused with the numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.planning import ModelShape, check_plan, lora_params, model_shape, plan_report
from posttrain.recipe import RecipeError, load_recipe
from tests.conftest import write_recipe


def _report(path: Path) -> dict:
    recipe = load_recipe(path)
    return plan_report(recipe, model_shape(recipe))


def test_parameter_counts_match_the_model(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    shape = ModelShape.from_config(json.loads((tiny_model / "config.json").read_text()), pad_vocab_to=64)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    assert lora_params(shape, 4, ["q_proj", "v_proj"]) == 2048  # what the LoRA training job reports


def test_fsdp_shards_the_states_ddp_does_not(tmp_path: Path, tiny_model: Path) -> None:
    fsdp = _report(write_recipe(tmp_path / "a", compute={"workers": 4}))
    ddp = _report(write_recipe(tmp_path / "b", compute={"workers": 4}, training={"max_steps": 4, "sharding": "ddp"}))
    assert ddp["bytes"]["weights_grads_optimizer"] == 4 * fsdp["bytes"]["weights_grads_optimizer"]
    lora = _report(write_recipe(tmp_path / "c", model={"base": str(tiny_model), "lora": {"rank": 4}}))
    assert lora["trainable_params"] == 2048
    assert lora["bytes"]["weights_grads_optimizer"] < fsdp["bytes"]["weights_grads_optimizer"]


def test_plan_command_refuses_a_plan_over_budget(tmp_path: Path, tiny_model: Path) -> None:
    ok = write_recipe(tmp_path / "ok", compute={"workers": 2, "memory_per_worker_gib": 8})
    out = subprocess.run([sys.executable, "-m", "posttrain", "plan", str(ok)], capture_output=True, text=True)
    assert out.returncode == 0 and json.loads(out.stdout)["fits"] is True
    tight = write_recipe(tmp_path / "tight", compute={"workers": 2, "memory_per_worker_gib": 0.001})
    out = subprocess.run([sys.executable, "-m", "posttrain", "plan", str(tight)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "compute.memory_per_worker_gib: the plan needs about" in out.stderr
    assert "the budget is 0.001 GiB" in out.stderr


def test_tensor_parallel_splits_the_blocks_and_must_divide_the_heads(tmp_path: Path, tiny_model: Path) -> None:
    tp = _report(write_recipe(tmp_path / "tp", compute={"workers": 2},
                              training={"max_steps": 4, "sharding": "fsdp_tp", "tensor_parallel": 2}))
    fsdp1 = _report(write_recipe(tmp_path / "one", compute={"workers": 1}))
    assert tp["strategy"] == "fsdp_tp" and tp["tensor_parallel"] == 2 and tp["data_parallel"] == 1
    assert tp["bytes"]["gathered_blocks"] == fsdp1["bytes"]["gathered_blocks"] // 2
    assert tp["bytes"]["weights_grads_optimizer"] < fsdp1["bytes"]["weights_grads_optimizer"]
    assert tp["bytes"]["activations"] < fsdp1["bytes"]["activations"]
    # The tiny model has 2 attention heads: a TP degree of 4 can't split them.
    four = load_recipe(write_recipe(tmp_path / "four", compute={"workers": 4},
                                    training={"max_steps": 4, "tensor_parallel": 4}))
    with pytest.raises(RecipeError) as err:
        check_plan(four, source="four.yaml")
    assert "four.yaml: training.tensor_parallel: tensor parallel degree 4 does not divide the model's 2 attention " \
           "heads" in str(err.value)


@pytest.mark.parametrize(("sections", "message"), [
    ({"compute": {"workers": 3}, "training": {"max_steps": 4, "tensor_parallel": 2}},
     "training.tensor_parallel 2 does not divide compute.workers 3"),
    ({"training": {"max_steps": 4, "tensor_parallel": 2}, "model": {"base": "x", "lora": {"rank": 4}}},
     "tensor parallel with LoRA is not implemented yet"),
    ({"training": {"max_steps": 4, "sharding": "fsdp_tp"}}, "sharding 'fsdp_tp' needs tensor_parallel ≥ 2"),
    ({"training": {"max_steps": 4, "sharding": "ddp", "tensor_parallel": 2}}, "needs sharding 'fsdp_tp'"),
])
def test_impossible_parallel_settings_are_refused_by_the_schema(tmp_path: Path, sections: dict, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe(tmp_path, **sections))


def test_auto_activation_checkpointing_turns_on_only_when_the_step_would_not_fit(tmp_path: Path,
                                                                               tiny_model: Path) -> None:
    from posttrain.planning import choose_plan, estimate

    recipe = load_recipe(write_recipe(tmp_path, data={"max_seq_len": 2048}, training={"max_steps": 4,
                                                                                      "micro_batch_size": 8}))
    shape = model_shape(recipe)
    without = estimate(recipe, shape, 2, 4, False, "fsdp")["total_gib_per_device"]
    with_ac = estimate(recipe, shape, 2, 4, True, "fsdp")["total_gib_per_device"]
    assert with_ac < without
    tight = choose_plan(recipe, 2, "cpu", False, shape, memory_gib=(with_ac + without) / 2)
    roomy = choose_plan(recipe, 2, "cpu", False, shape, memory_gib=4 * without)
    assert tight.activation_checkpointing and not roomy.activation_checkpointing
    assert f"about {without} GiB per device without it" in tight.reasons[0]
    # An explicit setting wins over the estimate.
    forced = load_recipe(write_recipe(tmp_path / "f", training={"max_steps": 4, "activation_checkpointing": False}))
    assert not choose_plan(forced, 2, "cpu", False, shape, memory_gib=1e-6).activation_checkpointing


def test_on_ec2_the_worker_gpu_is_the_memory_budget(tmp_path: Path, tiny_model: Path) -> None:
    """No memory_per_worker_gib: the plan budgets with the worker type's GPU (g5 → A10G, 24 GiB)."""
    ec2 = {"region": "us-east-1", "worker_instance_type": "g5.xlarge", "worker_nodes": 2,
           "ami": "ami-0123456789abcdef0", "subnet_id": "subnet-0123456789abcdef0",
           "security_group_ids": ["sg-0123456789abcdef0"], "iam_instance_profile": "p", "image": "img:1"}
    report = _report(write_recipe(tmp_path, compute={"provider": "ec2", "workers": 2, "gpus_per_worker": 1,
                                                     "ec2": ec2}))
    assert report["device"] == "cuda" and report["param_dtype"] == "bfloat16"
    assert report["memory_per_worker_gib"] == 24 and report["fits"] is True
    assert report["activation_checkpointing"] is False and "24 GiB available" in report["reasons"][0]


@pytest.mark.parametrize(("base", "config", "reason"), [
    ("no-config", None, "the config.json of model.base file://{dir}/no-config does not exist"),
    ("hf://nobody/not-cached", None, "the config.json of model.base hf://nobody/not-cached is not in the Hugging "
                                     "Face cache (nothing is downloaded)"),
    ("mamba", {"model_type": "mamba", "vocab_size": 10}, "model_type 'mamba' is not an architecture the plan can read"),
])
def test_a_plan_that_cannot_be_checked_says_so(tmp_path: Path, base: str, config: dict | None, reason: str) -> None:
    """Never skipped silently: the first task logs what it did not check, `posttrain plan` fails saying why."""
    if config is not None:
        (tmp_path / base).mkdir()
        (tmp_path / base / "config.json").write_text(json.dumps(config))
    elif "://" not in base:
        (tmp_path / base).mkdir()
    path = write_recipe(tmp_path, model={"base": base})
    report = check_plan(load_recipe(path))
    assert report["checked"] is False and reason.format(dir=tmp_path) in report["reason"]
    out = subprocess.run([sys.executable, "-m", "posttrain", "plan", str(path)], capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == ""
    assert f"{path}: plan not checked (tensor-parallel degree, memory per device): " in out.stderr
    assert reason.format(dir=tmp_path) in out.stderr
