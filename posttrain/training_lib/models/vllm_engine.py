"""The one way this package builds a vLLM engine, and the sampling rules every caller shares.

The engine runs in-process (no spawned engine workers), on 127.0.0.1, with a small KV cache on the
CPU; each caller picks the precision and how many sequences run at once. Sampling is restricted to
the tokenizer's real ids (the rows added by vocabulary padding are not tokens) and stops at the end
of the reply. vLLM reads its environment when imported, so it is imported only here, after the
loopback defaults are set.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from posttrain.prep.chat import end_of_turn_token

# In-process engine (no spawned workers), a small KV cache, everything on loopback, no telemetry.
LOOPBACK_DEFAULTS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                     "VLLM_HOST_IP": "127.0.0.1", "VLLM_LOOPBACK_IP": "127.0.0.1",
                     "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1"}


def loopback_defaults() -> None:
    """Set LOOPBACK_DEFAULTS before vLLM is imported; variables already set win."""
    for key, value in LOOPBACK_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _vllm() -> Any:
    loopback_defaults()
    # Imported here, not at the top: vLLM reads the variables above at import, and only the stages
    # that generate should pay for importing it.
    import vllm

    return vllm


def make_engine(model_dir: str | Path, max_model_len: int, *, dtype: str = "float32", seed: int = 0,
                max_num_seqs: int = 16) -> Any:
    """A vLLM `LLM` on the Hugging Face model in `model_dir` (eager: no CUDA graphs to capture)."""
    return _vllm().LLM(model=str(model_dir), dtype=dtype, max_model_len=max_model_len, enforce_eager=True, seed=seed,
                       max_num_seqs=max_num_seqs)


def stop_token_ids(tokenizer: Any, model_dir: str | Path | None = None) -> list[int]:
    """Where a reply ends, from the model itself: the EOS ids of its generation_config.json (in
    `model_dir`, by default the folder the tokenizer was loaded from), the tokenizer's EOS, and the
    end-of-turn token of its chat template (the special token that closes an assistant reply:
    Llama `<|eot_id|>`, Gemma `<end_of_turn>`, Phi `<|end|>`, ChatML `<|im_end|>`)."""
    ids: set = {tokenizer.eos_token_id}
    config = Path(model_dir or getattr(tokenizer, "name_or_path", "") or ".") / "generation_config.json"
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos])
    eot = end_of_turn_token(tokenizer)
    if eot is not None:
        ids.add(tokenizer.convert_tokens_to_ids(eot))
    unk = getattr(tokenizer, "unk_token_id", None)
    return sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != unk)


def sampling_params(vocab: int, stop_ids: list[int], **settings: Any) -> Any:
    """vLLM SamplingParams with `settings` (temperature, max_tokens, n, seed, ...) that sample only
    the tokenizer's `vocab` real ids and stop at `stop_ids` (see stop_token_ids)."""
    return _vllm().SamplingParams(**settings, stop_token_ids=stop_ids, allowed_token_ids=list(range(vocab)))


def scoring_params() -> Any:
    """SamplingParams that only score a prompt: its tokens' log-probs, one token generated."""
    return _vllm().SamplingParams(max_tokens=1, prompt_logprobs=0)
