"""The plan reads each family from config.json: parameter counts equal the models' own (tied
embeddings once, q/k norms, Gemma's four norms, every expert), MoE active parameters per token are
the routed experts only, and the published sizes of real checkpoints come out of their configs.
Tensor parallel on an MoE or a family without a TP plan is refused by the plan check, naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.planning import ModelShape, check_plan, lora_params
from posttrain.recipe import RecipeError, load_recipe
from tests.conftest import tiny_family, write_recipe

# config.json of the released checkpoints (the fields the shape reads).
QWEN3_30B_A3B = {"model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 48,
                 "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144,
                 "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
                 "decoder_sparse_step": 1, "mlp_only_layers": [], "tie_word_embeddings": False}
GEMMA3_1B = {"model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 1152, "num_hidden_layers": 26,
             "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "intermediate_size": 6912,
             "sliding_window": 512, "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 4
             + ["sliding_attention"] * 2}


def test_published_sizes_come_out_of_the_configs() -> None:
    moe = ModelShape.from_config(QWEN3_30B_A3B)
    # Hand count, per block: attention 2048·4096·2 + 2048·512·2 = 18,874,368; router 2048·128 =
    # 262,144; one expert 3·2048·768 = 4,718,592 (all 128 held, 8 run per token); norms 2·2048 +
    # 2·128 = 4,352. Embedding and lm_head 2·151936·2048 = 622,329,856, final norm 2,048.
    block_all = 18_874_368 + 262_144 + 128 * 4_718_592 + 4_352
    block_active = 18_874_368 + 262_144 + 8 * 4_718_592 + 4_352
    assert moe.params() == 48 * block_all + 622_329_856 + 2_048 == 30_532_122_624  # "30.5B"
    assert moe.active_params() == 48 * block_active + 622_329_856 + 2_048 == 3_353_032_704  # "3.3B activated"
    gemma = ModelShape.from_config(GEMMA3_1B)
    # Tied embedding once (262144·1152); per block q/o 1152·1024, k/v 1152·256, MLP 3·1152·6912,
    # four norms of 1152 and q/k norms of 256.
    block = 2 * 1152 * 1024 + 2 * 1152 * 256 + 3 * 1152 * 6912 + 4 * 1152 + 2 * 256
    assert gemma.params() == 26 * block + 262144 * 1152 + 1152 == 999_885_952
    assert gemma.sliding_window == 512 and len(gemma.sliding_layers) == 22
    # A multimodal Gemma 3's config nests the text model.
    nested = ModelShape.from_config({"model_type": "gemma3", "text_config": GEMMA3_1B})
    assert nested.params() == gemma.params()


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3", "mistral", "qwen3_moe"])
def test_parameter_counts_match_each_family_model(name: str) -> None:
    from transformers import AutoModelForCausalLM

    folder = tiny_family(name)
    model = AutoModelForCausalLM.from_pretrained(folder)
    shape = ModelShape.from_config(json.loads((folder / "config.json").read_text()))
    assert shape.params() == sum(p.numel() for p in model.parameters())  # a tied weight once
    peft_targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(model, LoraConfig(r=4, target_modules=peft_targets))
    assert lora_params(shape, 4, peft_targets) == sum(p.numel() for n, p in adapted.named_parameters() if "lora_" in n)


def test_tiny_moe_active_and_total_by_hand() -> None:
    shape = ModelShape.from_config(json.loads((tiny_family("qwen3_moe") / "config.json").read_text()))
    # Per block: attention 64·128·2 + 64·64·2 = 24,576; router 64·4 = 256; expert 3·64·32 = 6,144;
    # norms 2·64 + 2·32 = 192. Untied 437-token embedding and lm_head: 2·437·64 = 55,936; final norm 64.
    assert shape.params() == 2 * (24_576 + 256 + 4 * 6_144 + 192) + 55_936 + 64 == 155_200
    assert shape.active_params() == 2 * (24_576 + 256 + 2 * 6_144 + 192) + 55_936 + 64 == 130_624
    assert shape.mlp_width() == 2 * 32


def test_tensor_parallel_on_moe_is_refused_by_the_plan(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, model={"base": str(tiny_family("qwen3_moe"))}, compute={"workers": 2},
                                      training={"max_steps": 4, "sharding": "fsdp_tp", "tensor_parallel": 2}))
    with pytest.raises(RecipeError) as err:
        check_plan(recipe, source="moe.yaml")
    assert ("moe.yaml: training.tensor_parallel: tensor parallel is not supported for MoE yet (model_type qwen3_moe, "
            "4 experts)") in str(err.value)
    fsdp = load_recipe(write_recipe(tmp_path / "fsdp", model={"base": str(tiny_family("qwen3_moe"))},
                                    compute={"workers": 2}))
    assert check_plan(fsdp)["checked"] is True


def test_tensor_parallel_needs_a_family_with_a_plan(tmp_path: Path) -> None:
    model = tmp_path / "phi"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({**GEMMA3_1B, "model_type": "phi3", "num_key_value_heads": 2}))
    recipe = load_recipe(write_recipe(tmp_path, model={"base": str(model)}, compute={"workers": 2},
                                      training={"max_steps": 4, "sharding": "fsdp_tp", "tensor_parallel": 2}))
    with pytest.raises(RecipeError, match="no tensor-parallel plan for model_type 'phi3'; the families with one: "
                                          "llama, mistral, qwen2, qwen3, gemma3_text"):
        check_plan(recipe)


def test_the_plan_check_and_the_parallelizer_know_the_same_families() -> None:
    from posttrain.planning import TENSOR_PARALLEL_TYPES
    from posttrain.training_lib.parallel.parallelize import TP_PLANS

    assert tuple(TP_PLANS) == TENSOR_PARALLEL_TYPES
