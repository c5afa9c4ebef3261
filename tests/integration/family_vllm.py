"""vLLM (CPU, in-process engine) on each exported family model: `python -m tests.integration.family_vllm
OUT.json DIR...` writes one JSON object, per folder what the engine generated for a chat prompt and
why it stopped. One process for every family: vLLM's import is the slow part, each engine is freed before
the next starts."""

from __future__ import annotations

import gc
import json
import sys
import traceback
from pathlib import Path

MIN_TOKENS = 3


def generate(folder: str) -> dict:
    from transformers import AutoTokenizer

    from posttrain.prep.chat import end_of_turn_token
    from posttrain.training_lib.models.vllm_engine import make_engine, sampling_params, stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(folder)
    eot = end_of_turn_token(tokenizer)
    stops = stop_token_ids(tokenizer, folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                           add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    llm = make_engine(folder, max_model_len=128, max_num_seqs=1)
    try:
        # A random model has no reason to end its reply: the end-of-turn token gets a large bias, and
        # min_tokens holds every stop token back for the first MIN_TOKENS tokens. The engine must then
        # stop right at the end-of-turn token the stop list names (Gemma's is not its EOS).
        params = sampling_params(len(tokenizer), stops, temperature=0.0, max_tokens=16, min_tokens=MIN_TOKENS,
                                 logit_bias={tokenizer.convert_tokens_to_ids(eot): 100.0})
        out = llm.generate([{"prompt_token_ids": prompt_ids}], params, use_tqdm=False)[0].outputs[0]
        return {"ok": True, "end_of_turn": eot, "end_of_turn_id": tokenizer.convert_tokens_to_ids(eot),
                "stop_ids": stops, "token_ids": list(out.token_ids), "finish_reason": out.finish_reason,
                "text": out.text}
    finally:
        del llm
        gc.collect()


def main(folders: list[str]) -> None:
    results = {}
    for folder in folders:
        try:
            results[folder] = generate(folder)
        except Exception as exc:  # noqa: BLE001 - reported per family; the test decides
            results[folder] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                               "trace": traceback.format_exc()[-3000:]}
    Path(sys.argv[1]).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[2:])
