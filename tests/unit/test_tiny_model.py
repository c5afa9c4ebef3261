"""The tiny model fits vLLM's CPU kernels and its vocabulary is padded for even shards."""

from __future__ import annotations

import json


def test_tiny_model_shape(tiny_model, tokenizer) -> None:
    config = json.loads((tiny_model / "config.json").read_text())
    assert config["head_dim"] >= 32
    assert config["vocab_size"] % 64 == 0 and config["vocab_size"] >= len(tokenizer)
    assert len(tokenizer) < config["vocab_size"]  # the padding rows exist and are not tokens
    assert (tiny_model / "model.safetensors").exists()
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
