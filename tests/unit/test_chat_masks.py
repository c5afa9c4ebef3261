"""Loss masks come from the model's own chat template: only assistant replies (with their
end-of-turn marker) train, never system or user text."""

from __future__ import annotations

import json

import pytest

from posttrain.prep.chat import (
    TemplateError,
    chat_examples,
    chat_examples_batch,
    end_of_turn_token,
    fold_system_prompt,
    prompt_and_reference,
    tokenize_chat,
)
from tests.conftest import SAMPLE_DATA
from tests.fixtures.chat_templates import MARKERS_OUTSIDE_EOT, REAL, REWRITES_HISTORY, WORKING, tokenizer_for

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 3 plus 4?"},
    {"role": "assistant", "content": "3 plus 4 is 7."},
    {"role": "user", "content": "Reverse the order of these words: river stone"},
    {"role": "assistant", "content": "stone river"},
]


def decoded(tokenizer, tok) -> str:
    return tokenizer.decode([t for t, m in zip(tok.input_ids, tok.assistant_mask, strict=True) if m])


def labelled_text(tokenizer, messages) -> str:
    return decoded(tokenizer, tokenize_chat(tokenizer, messages))


def test_only_assistant_tokens_and_end_of_turn_train(tokenizer) -> None:
    assert labelled_text(tokenizer, CONVERSATION) == "3 plus 4 is 7.<|im_end|>stone river<|im_end|>"


def test_masks_on_the_whole_sample_corpus(tokenizer) -> None:
    with (SAMPLE_DATA / "train.jsonl").open() as fh:
        rows = [json.loads(line) for line in fh][:100]
    for row in rows:
        expected = "".join(m["content"] + "<|im_end|>" for m in row["messages"] if m["role"] == "assistant")
        assert labelled_text(tokenizer, row["messages"]) == expected


def test_template_that_rewrites_earlier_turns_trains_each_reply_as_seen_at_inference(tokenizer) -> None:
    # Like templates that drop the reasoning of earlier assistant turns: the render of a prefix
    # is not a prefix of the render of the whole conversation. Each reply gets its own example,
    # its history rendered as the template renders it when that reply is generated.
    rewriting = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    rewriting.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|im_start|>assistant\n"
        "(earlier)<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    examples = chat_examples(rewriting, CONVERSATION)
    assert [decoded(rewriting, e) for e in examples] == ["3 plus 4 is 7.<|im_end|>", "stone river<|im_end|>"]
    second = rewriting.decode(examples[1].input_ids)
    assert "(earlier)" in second and "3 plus 4 is 7." not in second
    with pytest.raises(TemplateError, match="2 examples"):
        tokenize_chat(rewriting, CONVERSATION)
    # Training only the last reply needs one example, as before.
    assert decoded(rewriting, tokenize_chat(rewriting, CONVERSATION, last_turn_only=True)) == "stone river<|im_end|>"


def test_prompt_and_reference_split_before_the_last_reply() -> None:
    prompt, reference = prompt_and_reference(CONVERSATION)
    assert prompt == CONVERSATION[:4] and reference == "stone river"


MULTI_TURN = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is the capital of Avel?"},
    {"role": "assistant", "content": "The capital of Avel is Morrow."},
    {"role": "user", "content": "What is 12 minus 5?"},
    {"role": "assistant", "content": "12 minus 5 is 7."},
    {"role": "user", "content": "Reverse: stone river"},
    {"role": "assistant", "content": "river stone"},
]


@pytest.mark.parametrize("family", WORKING, ids=lambda f: f.name)
def test_labels_are_exactly_the_replies_on_every_template_family(tokenizer, family) -> None:
    tok = tokenizer_for(tokenizer, family)
    replies = [m["content"] for m in MULTI_TURN if m["role"] == "assistant"]
    assert labelled_text(tok, MULTI_TURN) == "".join(r + family.end_of_turn for r in replies)
    # The labelled ids are the ids the model sees: the conversation tokenized once, as rendered.
    full = tok.apply_chat_template(MULTI_TURN, tokenize=False)
    assert tokenize_chat(tok, MULTI_TURN).input_ids == tok(full, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", WORKING, ids=lambda f: f.name)
def test_last_turn_only(tokenizer, family) -> None:
    tok = tokenizer_for(tokenizer, family)
    out = tokenize_chat(tok, MULTI_TURN, last_turn_only=True)
    labelled = tok.decode([t for t, m in zip(out.input_ids, out.assistant_mask, strict=True) if m])
    assert labelled == "river stone" + family.end_of_turn


def test_reasoning_stripping_template_expands_per_reply(tokenizer) -> None:
    tok = tokenizer_for(tokenizer, REWRITES_HISTORY)
    conversation = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>x</think>a1"},
                    {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    first, second = chat_examples(tok, conversation)
    assert decoded(tok, first) == "<think>x</think>a1<|im_end|>"  # its reasoning trains where it is generated
    assert decoded(tok, second) == "a2<|im_end|>"
    assert "<think>" not in tok.decode(second.input_ids)  # the history as the template renders it


# --- the real templates of the model families (tests/fixtures/templates, sources in the fixture) ---

THINKING = [
    {"role": "user", "content": "What is 12 minus 5?"},
    {"role": "assistant", "content": "<think>\n12 take away 5.\n</think>\n\n12 minus 5 is 7."},
    {"role": "user", "content": "Reverse: stone river"},
    {"role": "assistant", "content": "river stone"},
]


def _reply(family, text: str) -> str:
    """A reply as the family's model writes it after the generation prompt."""
    if family.name == "qwen3":  # the template opens every reply it generates with an (empty) think block
        text = "<think>\n\n</think>\n\n" + text
    if family.name == "mistral-v0.3":  # its replies start with a space
        text = " " + text
    return text + family.end_of_turn


def _messages(family, messages):
    return messages if family.system_role else fold_system_prompt(messages)


def _prompt_text(tok, messages, i) -> str:
    return tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("family", REAL, ids=lambda f: f.name)
def test_real_templates_train_exactly_the_replies_and_their_end_of_turn(tokenizer, family) -> None:
    tok = tokenizer_for(tokenizer, family)
    messages = _messages(family, MULTI_TURN)
    examples = chat_examples(tok, messages)
    labelled = "".join(decoded(tok, e) for e in examples)
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert labelled == "".join(_reply(family, r) for r in replies)
    for e in examples:  # no BOS, role header, generation prompt or trailing newline trains
        if tok.bos_token_id is not None:
            assert not any(m for t, m in zip(e.input_ids, e.assistant_mask, strict=True) if t == tok.bos_token_id)
        assert not e.assistant_mask[0]
    # Every example's untrained head is the prompt the model is given at inference time.
    trained = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for e in examples:
        first = e.assistant_mask.index(True)
        head = tok.decode(e.input_ids[:first])
        assert any(_prompt_text(tok, messages, i).startswith(head) for i in trained)


@pytest.mark.parametrize("family", [f for f in REAL if f.name in ("llama3", "qwen2.5", "gemma3", "phi3")],
                         ids=lambda f: f.name)
def test_append_only_templates_give_one_example_tokenized_as_rendered(tokenizer, family) -> None:
    tok = tokenizer_for(tokenizer, family)
    full = tok.apply_chat_template(MULTI_TURN, tokenize=False)
    assert tokenize_chat(tok, MULTI_TURN).input_ids == tok(full, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", REAL, ids=lambda f: f.name)
def test_real_templates_last_turn_only(tokenizer, family) -> None:
    tok = tokenizer_for(tokenizer, family)
    out = tokenize_chat(tok, _messages(family, MULTI_TURN), last_turn_only=True)
    assert decoded(tok, out) == _reply(family, "river stone")


@pytest.mark.parametrize("family", REAL, ids=lambda f: f.name)
def test_preference_completion_trains_from_its_first_message(tokenizer, family) -> None:
    tok = tokenizer_for(tokenizer, family)
    messages = _messages(family, MULTI_TURN)
    k = len(messages) - 1
    out = tokenize_chat(tok, messages, train_from_message=k)
    assert decoded(tok, out) == _reply(family, "river stone")


def _family(name):
    return next(f for f in REAL if f.name == name)


def test_qwen3_trains_each_reply_with_its_reasoning_and_counts_one_example_per_reply(tokenizer) -> None:
    tok = tokenizer_for(tokenizer, _family("qwen3"))
    first, second = chat_examples(tok, THINKING)
    assert decoded(tok, first) == "<think>\n12 take away 5.\n</think>\n\n12 minus 5 is 7.<|im_end|>"
    assert decoded(tok, second) == "<think>\n\n</think>\n\nriver stone<|im_end|>"
    # The second reply's history is what Qwen3 renders at inference: the earlier reasoning dropped.
    assert tok.decode(second.input_ids).startswith(_prompt_text(tok, THINKING, 3))
    assert "take away" not in tok.decode(second.input_ids)


def test_deepseek_r1_distill_trains_the_reasoning_after_its_prefilled_think(tokenizer) -> None:
    tok = tokenizer_for(tokenizer, _family("deepseek-r1-distill"))
    first, second = chat_examples(tok, THINKING)
    eos = "<｜end▁of▁sentence｜>"
    assert decoded(tok, first) == "12 take away 5.\n</think>\n\n12 minus 5 is 7." + eos
    assert decoded(tok, second) == "river stone" + eos
    untrained = tok.decode(first.input_ids[:first.assistant_mask.index(True)])
    assert untrained.endswith("<｜Assistant｜><think>\n")


def test_mistral_v03_system_prompt_moves_with_the_last_user_turn(tokenizer) -> None:
    tok = tokenizer_for(tokenizer, _family("mistral-v0.3"))
    examples = chat_examples(tok, MULTI_TURN)
    assert len(examples) == 3  # one per reply: the system prompt sits in each reply's own last user turn
    for e, question in zip(examples, ["What is the capital of Avel?", "What is 12 minus 5?", "Reverse"],
                            strict=True):
        assert f"[INST] Answer briefly.\n\n{question}" in tok.decode(e.input_ids)
    assert len(chat_examples(tok, MULTI_TURN[1:])) == 1  # without a system prompt it is append-only


def test_phi3_trailing_eos_stays_untrained_and_the_end_token_trains(tokenizer) -> None:
    tok = tokenizer_for(tokenizer, _family("phi3"))
    (example,) = chat_examples(tok, MULTI_TURN)
    assert tok.decode(example.input_ids).endswith("<|end|>\n<|endoftext|>")
    assert example.input_ids[-1] == tok.convert_tokens_to_ids("<|endoftext|>") and not example.assistant_mask[-1]
    assert decoded(tok, example).endswith("river stone<|end|>")


def test_generation_markers_leaving_the_end_of_turn_outside_still_train_it(tokenizer) -> None:
    tok = tokenizer_for(tokenizer, MARKERS_OUTSIDE_EOT)
    assert labelled_text(tok, MULTI_TURN) == (
        "The capital of Avel is Morrow.<|im_end|>12 minus 5 is 7.<|im_end|>river stone<|im_end|>")
    assert decoded(tok, tokenize_chat(tok, MULTI_TURN, last_turn_only=True)) == "river stone<|im_end|>"


def test_generation_markers_around_newlines_train_neither_newline(tokenizer) -> None:
    tok = tokenizer_for(tokenizer, _family("qwen2.5-trl-markers"))
    out = tokenize_chat(tok, MULTI_TURN)
    labelled = [tok.decode([t]) for t, m in zip(out.input_ids, out.assistant_mask, strict=True) if m]
    assert labelled[0] != "\n" and labelled[-1] == "<|im_end|>"


def test_gemma2_refuses_a_system_turn_with_the_template_rule_and_folding_fixes_it(tokenizer) -> None:
    tok = tokenizer_for(tokenizer, _family("gemma2"))
    with pytest.raises(TemplateError, match="System role not supported.*fold_system_prompt"):
        chat_examples(tok, MULTI_TURN)
    folded = fold_system_prompt(MULTI_TURN)
    assert folded[0] == {"role": "user", "content": "Answer briefly.\n\nWhat is the capital of Avel?"}
    assert "Answer briefly." in tok.decode(tokenize_chat(tok, folded).input_ids)
    assert fold_system_prompt(MULTI_TURN[1:]) == MULTI_TURN[1:]


@pytest.mark.parametrize("family", [*REAL, *WORKING], ids=lambda f: f.name)
def test_end_of_turn_token_is_found_from_the_template(tokenizer, family) -> None:
    assert end_of_turn_token(tokenizer_for(tokenizer, family)) == family.end_of_turn


STOPS = {"llama3.1": "<|eot_id|>", "gemma3": "<end_of_turn>", "phi3.5": "<|end|>", "qwen3": "<|im_end|>",
         "mistral-v0.3": "</s>", "deepseek-r1-distill": "<｜end▁of▁sentence｜>", "phi4": "<|im_end|>"}


@pytest.mark.parametrize("name", sorted(STOPS))
def test_stop_tokens_come_from_the_template_and_the_tokenizer(tokenizer, name, tmp_path) -> None:
    from posttrain.training_lib.models.vllm_engine import stop_token_ids

    tok = tokenizer_for(tokenizer, _family(name))
    ids = stop_token_ids(tok, tmp_path)  # no generation_config.json there
    assert tok.convert_tokens_to_ids(STOPS[name]) in ids and tok.eos_token_id in ids
    if STOPS[name] != "<|im_end|>":  # the tiny tokenizer's own ChatML token is no stop of another family
        assert tok.convert_tokens_to_ids("<|im_end|>") not in ids


def test_stop_tokens_include_the_generation_config_eos_list(tokenizer, tmp_path) -> None:
    from posttrain.training_lib.models.vllm_engine import stop_token_ids

    tok = tokenizer_for(tokenizer, _family("llama3.1"))
    end_of_text = tok.convert_tokens_to_ids("<|end_of_text|>")
    eom = tok.convert_tokens_to_ids("<|eom_id|>")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [end_of_text, eom]}))
    assert stop_token_ids(tok, tmp_path) == sorted({end_of_text, eom, tok.convert_tokens_to_ids("<|eot_id|>")})


def test_prepare_records_expanded_examples_and_folds_system_prompts(tokenizer, tmp_path) -> None:
    from posttrain.prep.prepare import prepare_chat
    from posttrain.recipe import load_recipe
    from tests.conftest import write_recipe

    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in [MULTI_TURN, MULTI_TURN[:3]]))
    recipe = load_recipe(write_recipe(tmp_path, data={"train": str(data), "eval": str(data), "max_seq_len": 512}))
    qwen3 = tokenizer_for(tokenizer, _family("qwen3"))
    stats = prepare_chat(qwen3, str(data), recipe, tmp_path, "train")
    assert (stats["rows"], stats["examples"], stats["expanded_rows"], stats["documents"]) == (2, 4, 1, 4)

    gemma2 = tokenizer_for(tokenizer, _family("gemma2"))
    with pytest.raises(TemplateError, match=r"chat.jsonl line 1: .*System role not supported"):
        prepare_chat(gemma2, str(data), recipe, tmp_path, "train")
    folded = load_recipe(write_recipe(tmp_path, data={"train": str(data), "eval": str(data), "max_seq_len": 512,
                                                      "fold_system_prompt": True}))
    stats = prepare_chat(gemma2, str(data), folded, tmp_path, "train")
    assert (stats["rows"], stats["examples"], stats["expanded_rows"]) == (2, 2, 0)


@pytest.mark.parametrize("data_format", ["preference", "prompt"])
def test_a_refused_preference_or_prompt_row_is_named_by_file_and_line(tokenizer, tmp_path, data_format) -> None:
    from posttrain.prep.prepare import prepare_split
    from posttrain.recipe import load_recipe
    from tests.conftest import write_recipe

    prompt = [{"role": "user", "content": "What is 2 plus 2?"}]
    system = [{"role": "system", "content": "Be brief."}, *prompt]
    reply = [{"role": "assistant", "content": "4"}]
    rows = [{"prompt": prompt, "chosen": reply, "rejected": reply, "answer": "4"},
            {"prompt": system, "chosen": reply, "rejected": reply, "answer": "4"}]
    data = tmp_path / f"{data_format}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    paradigm = {"paradigm": "dpo"} if data_format == "preference" else {
        "paradigm": "grpo", "grpo": {"rewards": [{"name": "exact_match"}]}}
    recipe = load_recipe(write_recipe(tmp_path, data={"format": data_format, "train": str(data), "eval": str(data),
                                                      "max_seq_len": 512}, **paradigm))
    gemma2 = tokenizer_for(tokenizer, _family("gemma2"))
    with pytest.raises(TemplateError, match=rf"{data_format}.jsonl line 2: .*System role not supported"):
        prepare_split(gemma2, str(data), recipe, tmp_path, "train")


@pytest.mark.parametrize("last_turn_only", [False, True])
@pytest.mark.parametrize("family", [*REAL, *WORKING, MARKERS_OUTSIDE_EOT], ids=lambda f: f.name)
def test_a_batch_of_conversations_gives_each_the_examples_of_its_own(tokenizer, family, last_turn_only) -> None:
    # prepare renders and tokenizes a marker template's rows together: the ids and masks must be
    # those each conversation gets alone.
    tok = tokenizer_for(tokenizer, family)
    conversations = [_messages(family, c) for c in (MULTI_TURN, MULTI_TURN[:3], CONVERSATION, MULTI_TURN[1:5])]
    alone = [chat_examples(tok, c, last_turn_only) for c in conversations]
    assert chat_examples_batch(tok, conversations, last_turn_only) == alone
    assert chat_examples_batch(tok, conversations[:1], last_turn_only) == alone[:1]


def test_a_row_refused_inside_a_batch_is_named_by_its_line(tokenizer, tmp_path) -> None:
    from posttrain.prep.prepare import prepare_chat
    from posttrain.recipe import load_recipe
    from tests.conftest import write_recipe

    strict = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    strict.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                            "{% endif %}" + tokenizer_for(tokenizer, WORKING[-1]).chat_template)
    assert "{% generation %}" in strict.chat_template  # the batched path
    rows = [MULTI_TURN[1:], MULTI_TURN[1:3], MULTI_TURN, MULTI_TURN[1:]]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    recipe = load_recipe(write_recipe(tmp_path, data={"train": str(data), "eval": str(data), "max_seq_len": 512}))
    with pytest.raises(TemplateError, match=r"chat.jsonl line 3: .*System role not supported"):
        prepare_chat(strict, str(data), recipe, tmp_path / "out", "train")
