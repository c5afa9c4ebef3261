"""`posttrain plan`: the parameter counts are the model's, sharding divides what it should, and a
plan that doesn't fit the memory budget is refused with the numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from posttrain.recipe import load_recipe
from posttrain.training_lib.parallel.estimate import ModelShape, lora_params, plan_report
from tests.conftest import write_recipe


def test_parameter_counts_match_the_model(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    shape = ModelShape.from_config(json.loads((tiny_model / "config.json").read_text()), pad_vocab_to=64)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    assert lora_params(shape, 4, ["q_proj", "v_proj"]) == 2048  # what the LoRA training job reports


def test_fsdp_shards_the_states_ddp_does_not(tmp_path: Path, tiny_model: Path) -> None:
    fsdp = plan_report(load_recipe(write_recipe(tmp_path / "a", compute={"workers": 4})), tiny_model / "config.json")
    ddp = plan_report(load_recipe(write_recipe(tmp_path / "b", compute={"workers": 4},
                                               training={"max_steps": 4, "sharding": "ddp"})),
                      tiny_model / "config.json")
    assert ddp["bytes"]["weights_grads_optimizer"] == 4 * fsdp["bytes"]["weights_grads_optimizer"]
    lora = plan_report(load_recipe(write_recipe(tmp_path / "c", model={"base": str(tiny_model), "lora": {"rank": 4}})),
                       tiny_model / "config.json")
    assert lora["trainable_params"] == 2048
    assert lora["bytes"]["weights_grads_optimizer"] < fsdp["bytes"]["weights_grads_optimizer"]


def test_plan_command_refuses_a_plan_over_budget(tmp_path: Path, tiny_model: Path) -> None:
    ok = write_recipe(tmp_path / "ok", compute={"workers": 2, "memory_per_worker_gib": 8})
    out = subprocess.run([sys.executable, "-m", "posttrain", "plan", str(ok)], capture_output=True, text=True)
    assert out.returncode == 0 and json.loads(out.stdout)["fits"] is True
    tight = write_recipe(tmp_path / "tight", compute={"workers": 2, "memory_per_worker_gib": 0.01})
    out = subprocess.run([sys.executable, "-m", "posttrain", "plan", str(tight)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "compute.memory_per_worker_gib: the plan needs about" in out.stderr
    assert "the budget is 0.01 GiB" in out.stderr
