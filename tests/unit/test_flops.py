"""The FLOPs formula against FLOPs counted by torch over a real forward + backward.

Attention is eager here: FlopCounterMode has no formula for the CPU flash SDPA kernel (it would
count that attention as 0) and counts attention matmuls over the whole square whatever the mask,
so the comparison uses the formula's `causal=False` (every query against every key of the block).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from posttrain.planning import ModelShape, lora_params
from posttrain.recipe import LoraConfig
from posttrain.training_lib.flops import attended_keys, device_peak_flops, mfu, peak_tflops, training_flops

BATCH, SEQ = 2, 32


def counted_flops_per_token(lora: LoraConfig | None) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    # Grouped-query attention and an intermediate size that isn't a multiple of hidden: every
    # projection has its own shape.
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                         tie_word_embeddings=False)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if lora is not None:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        model = get_peft_model(model, PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                                                     target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    if lora is not None:  # the frozen base got no weight gradients, the adapters did
        assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
        assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    return counter.get_total_flops() / (BATCH * SEQ)


SHAPE = ModelShape(vocab=256, hidden=64, layers=3, heads=4, kv_heads=2, head_dim=16, intermediate=176, tied=False)


@pytest.mark.parametrize("targets", [None, ["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj"],
                                     ["k_proj", "o_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]])
def test_formula_matches_counted_flops(targets: list[str] | None) -> None:
    lora = LoraConfig(rank=4, target_modules=targets, dropout=0.0) if targets else None
    counted = counted_flops_per_token(lora)
    formula = training_flops(SHAPE, SEQ, lora, causal=False)
    # Equal today; the tolerance leaves room for a transformers release adding a small matmul.
    assert formula.total == pytest.approx(counted, rel=0.02)


def test_lora_needs_weight_gradients_of_the_adapters_only() -> None:
    full = training_flops(SHAPE, SEQ)
    lora = LoraConfig(rank=4, target_modules=["q_proj", "v_proj"])
    adapted = training_flops(SHAPE, SEQ, lora)
    assert full.weight_grads == pytest.approx(2 * (SHAPE.params() - SHAPE.vocab * SHAPE.hidden
                                                   - SHAPE.layers * 2 * SHAPE.hidden - SHAPE.hidden))
    assert adapted.weight_grads == 2 * lora_params(SHAPE, 4, ["q_proj", "v_proj"])
    # The backward is no longer ~2× the forward: input gradients only (plus the adapters').
    assert adapted.backward < 1.2 * adapted.forward < full.backward


def test_causal_attention_counts_the_keys_each_query_sees() -> None:
    full, causal = training_flops(SHAPE, SEQ, causal=False), training_flops(SHAPE, SEQ)
    attention_full = full.total - training_flops(SHAPE, 0, causal=False).total
    attention_causal = causal.total - training_flops(SHAPE, 0, causal=False).total
    assert attention_causal == pytest.approx(attention_full * (SEQ + 1) / 2 / SEQ)


def test_peak_table_and_mfu() -> None:
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert peak_tflops("NVIDIA H100 NVL", "float32") == 60.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "float32", tf32=True) == 156.0
    assert peak_tflops("NVIDIA A10G", "bfloat16") == peak_tflops("NVIDIA A10", "bfloat16") == 125.0
    assert peak_tflops("NVIDIA L4", "bfloat16") == 121.0 and peak_tflops("NVIDIA L40S", "bfloat16") == 362.1
    assert peak_tflops("Some Future GPU", "bfloat16") is None
    assert device_peak_flops("cpu", "float32") is None
    assert device_peak_flops("cpu", "float32", override_tflops=2.5) == 2.5e12
    assert mfu(1000.0, 6e9, 1e13) == pytest.approx(0.6)
    assert mfu(1000.0, 6e9, None) is None


# --- the other families: Qwen3 (q/k norms, tied), Gemma 3 (sliding layers, four norms), Qwen3-MoE ---

def _family_config(kind: str):  # noqa: ANN202 - a transformers config
    from transformers import AutoConfig

    shared = {"vocab_size": 211, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 96, "max_position_embeddings": 128}
    extra = {"qwen3": {"tie_word_embeddings": True},
             "gemma3_text": {"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"],
                             "query_pre_attn_scalar": 32},
             "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                           "mlp_only_layers": [], "decoder_sparse_step": 1}}[kind]
    config = AutoConfig.for_model(kind, **shared, **extra)
    config._attn_implementation = "eager"
    if kind == "qwen3_moe":  # the per-expert loop of linears: FlopCounterMode has no formula for grouped_mm
        config._experts_implementation = "eager"
    return config


@pytest.mark.parametrize("kind", ["qwen3", "gemma3_text", "qwen3_moe"])
def test_formula_matches_counted_flops_of_each_family(kind: str) -> None:
    """Torch counts what really runs: for the MoE only each token's 2 of 4 experts (the active
    parameters), plus the router."""
    from transformers import AutoModelForCausalLM

    config = _family_config(kind)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    shape = ModelShape.from_config(config.to_dict())
    assert shape.params() == sum(p.numel() for p in model.parameters())
    # The window doesn't change what eager attention computes (the mask is applied to the full square).
    assert training_flops(shape, SEQ, causal=False).total == pytest.approx(counter.get_total_flops() / (BATCH * SEQ),
                                                                            rel=0.02)


def test_moe_flops_count_the_active_experts_only() -> None:
    moe = ModelShape.from_config(_family_config("qwen3_moe").to_dict())
    all_experts = ModelShape(**{**moe.__dict__, "experts_per_token": moe.experts})
    # Per block and token, forward: 2 FLOPs per weight of the 2 routed experts (3 × 64 × 24 each);
    # routing to all 4 would add 2 more experts' worth.
    expert = 3 * 64 * 24
    assert training_flops(all_experts, SEQ).forward - training_flops(moe, SEQ).forward == 2 * 2 * 2 * expert


def test_sliding_window_layers_attend_to_at_most_the_window() -> None:
    assert attended_keys(8, 3) == pytest.approx((1 + 2 + 3 + 3 + 3 + 3 + 3 + 3) / 8)
    assert attended_keys(8, None) == attended_keys(8, 8) == 4.5
    gemma = ModelShape.from_config(_family_config("gemma3_text").to_dict())
    assert gemma.sliding_layers == (0,) and gemma.sliding_window == 8
    full = ModelShape(**{**gemma.__dict__, "sliding_layers": ()})
    # One of the two layers sees at most 8 keys per query instead of (32 + 1) / 2 on average.
    matmul_fwd = 2 * 2 * 4 * 32  # two attention matmuls, 2 FLOPs per multiply-add, 4 heads × 32
    assert training_flops(full, SEQ).forward - training_flops(gemma, SEQ).forward == pytest.approx(
        matmul_fwd * (attended_keys(SEQ, None) - attended_keys(SEQ, 8)))
