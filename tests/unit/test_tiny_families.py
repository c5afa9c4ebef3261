"""`posttrain tiny-model --family`: each family's tiny model has the family's architecture, special
tokens, chat template and end-of-turn token, a vocabulary that is not a multiple of 64 (except the
shared llama), and head_dim 32; its chat masks train the reply and the end-of-turn token only."""

from __future__ import annotations

import json
import re

import pytest

from posttrain.cli import build_parser
from posttrain.training_lib.models.families import FAMILIES, TEMPLATES
from tests.conftest import tiny_family

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 + 4?"},
                {"role": "assistant", "content": "8"}]
EXPECTED = {  # model_type, end-of-turn token, tied embedding
    "llama": ("llama", "<|im_end|>", False),
    "qwen3": ("qwen3", "<|im_end|>", True),
    "gemma3": ("gemma3_text", "<end_of_turn>", True),
    "mistral": ("mistral", "</s>", False),
    "qwen3_moe": ("qwen3_moe", "<|im_end|>", False),
}


def test_the_cli_offers_every_family() -> None:
    choices = next(a.choices for a in build_parser()._subparsers._group_actions[0].choices["tiny-model"]._actions
                   if a.dest == "family")
    assert list(choices) == list(FAMILIES) == list(EXPECTED)


@pytest.mark.parametrize("name", [n for n in EXPECTED if n != "llama"])
def test_family_model_and_tokenizer(name: str) -> None:
    from transformers import AutoTokenizer

    from posttrain.prep.chat import chat_examples, end_of_turn_token
    from posttrain.training_lib.models.vllm_engine import stop_token_ids

    model_type, eot, tied = EXPECTED[name]
    folder = tiny_family(name)
    config = json.loads((folder / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(folder)
    assert config["model_type"] == model_type and config["head_dim"] == 32
    assert config["tie_word_embeddings"] is tied
    assert config["vocab_size"] == len(tok) and len(tok) % 64 != 0
    fam = FAMILIES[name]
    assert tok.chat_template == (TEMPLATES / fam.template_file).read_text(encoding="utf-8")
    assert [tok.convert_ids_to_tokens(i) for i in range(len(fam.special_tokens))] == list(fam.special_tokens)
    assert end_of_turn_token(tok) == eot
    assert tok.convert_tokens_to_ids(eot) in stop_token_ids(tok, folder)
    # Every reply trains with its end-of-turn token, nothing else does (Qwen3 renders an empty
    # reasoning block into the reply; Mistral and Qwen3 rewrite earlier turns: one example per reply).
    trained = []
    for ex in chat_examples(tok, CONVERSATION):
        text = tok.decode([t for t, m in zip(ex.input_ids, ex.assistant_mask, strict=True) if m])
        trained.append(re.sub(r"<think>\s*</think>|\s", "", text))
    assert "".join(trained) == f"5{eot}8{eot}"


def test_moe_family_has_experts() -> None:
    config = json.loads((tiny_family("qwen3_moe") / "config.json").read_text())
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"]) == (4, 2, 32)
