"""Generation with vLLM for the eval prompts, scored against the reference replies."""

from __future__ import annotations

import os
from pathlib import Path

from posttrain.recipe import Recipe
from posttrain.training_lib.data.chat import prompt_and_reference
from posttrain.training_lib.data.prepare import read_jsonl


def vllm_loopback_defaults() -> None:
    """Before vLLM is imported: in-process engine (no spawned workers), a small KV cache on the
    CPU, everything on loopback. Variables already set win."""
    # In-process engine (no spawned workers), a small KV cache, everything on loopback.
    for key, value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                       "VLLM_HOST_IP": "127.0.0.1", "VLLM_LOOPBACK_IP": "127.0.0.1",
                       "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"}.items():
        os.environ.setdefault(key, value)


def generate_and_score(recipe: Recipe, model_dir: Path) -> tuple[dict, list[dict]]:
    vllm_loopback_defaults()
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for _lineno, row in read_jsonl(recipe.data.eval):
        rows.append(prompt_and_reference(row["messages"]))
        if len(rows) >= recipe.evaluation.max_samples:
            break
    prompts = [tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
               for msgs, _ in rows]
    max_prompt = max(len(p) for p in prompts)
    max_len = max_prompt + recipe.evaluation.max_new_tokens
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=max_len, enforce_eager=True, seed=0,
              max_num_seqs=16)
    # Only real token ids may be sampled: the rows added by vocabulary padding are not tokens.
    params = SamplingParams(temperature=0.0, max_tokens=recipe.evaluation.max_new_tokens,
                            allowed_token_ids=list(range(len(tokenizer))))
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    samples, exact = [], 0
    for (msgs, reference), out in zip(rows, outputs, strict=True):
        text = out.outputs[0].text.strip()
        match = text == reference.strip()
        exact += match
        samples.append({"prompt": msgs, "reference": reference, "generated": text, "exact_match": match,
                        "generated_token_ids": list(out.outputs[0].token_ids)})
    return {"exact_match": exact / len(rows), "generated_samples": len(rows)}, samples
