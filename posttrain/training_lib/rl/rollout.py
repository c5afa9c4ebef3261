"""The rollout role: a vLLM engine that samples G completions per prompt and takes the policy's
weights after each update.

Weight sync: full weights arrive as a list of object-store buckets (each a few hundred MB at most)
and are streamed into vLLM's in-place reload one bucket at a time, so neither side ever holds a
second whole copy. With LoRA only the adapters travel: the engine keeps the base weights of the
adapted layers and merges W + scale · B·A itself before the reload. vLLM's reload is all-or-
nothing (a partial reload leaves stacked projections inconsistent), so every sync reloads every
tensor; the adapter path only saves the transfer.

The engine is models/vllm_engine.py's: in-process (no engine subprocess), on 127.0.0.1, with a
small KV cache on the CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import torch
from safetensors.torch import load_file

from posttrain import uris
from posttrain.training_lib.models.sharded_load import safetensors_index
from posttrain.training_lib.models.vllm_engine import make_engine, sampling_params, scoring_params


class RolloutEngine:
    """One vLLM engine on `model_dir` in `dtype` (the policy's: rollout and policy precision match).
    `vocab`: the tokenizer's size (only its ids are sampled); `stop_ids`: where a completion ends."""

    def __init__(self, model_dir: str, dtype: str, max_model_len: int, vocab: int, stop_ids: list[int],
                 seed: int = 0):
        model_dir = str(uris.model_dir(model_dir))  # a model URI: s3:// through this node's cache
        self.llm = make_engine(model_dir, max_model_len, dtype=dtype, seed=seed, max_num_seqs=64)
        # Each sync reloads every layer, and vLLM warns for each rotary embedding that it has no
        # weights to reload (it has none: its frequencies are computed): a line per layer per step.
        # Set once vLLM is imported: its logging setup resets the levels of loggers under "vllm".
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        self.model_dir, self.vocab, self.stop_ids = model_dir, vocab, stop_ids
        self.base: dict[str, Any] = {}  # base weights of the LoRA-adapted layers (adapter sync)
        self.version = 0

    def generate(self, prompts: list[list[int]], n: int, temperature: float, max_tokens: int, seed: int) -> dict:
        """n completions of each prompt: token ids, the sampling policy's log-prob of each token,
        and whether it stopped by itself. Seeded per call, so a resumed run samples the same."""
        params = [sampling_params(self.vocab, self.stop_ids, n=n, temperature=temperature, max_tokens=max_tokens,
                                  logprobs=0, seed=seed + i)
                  for i in range(len(prompts))]
        start = time.perf_counter()
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        completions = []
        for out in outputs:
            for c in out.outputs:
                ids = list(c.token_ids)
                logps = [entry[tok].logprob for tok, entry in zip(ids, c.logprobs, strict=True)]
                completions.append({"ids": ids, "logprobs": logps, "text": c.text,
                                    "stopped": c.finish_reason == "stop"})
        tokens = sum(len(c["ids"]) for c in completions)
        return {"completions": completions, "seconds": seconds, "tokens": tokens, "version": self.version}

    def prompt_logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[i] | ids[:i]) for i ≥ 1 under the engine's current weights (the sync check)."""
        out = self.llm.generate([{"prompt_token_ids": ids}], scoring_params(), use_tqdm=False)
        return [entry[tok].logprob for tok, entry in zip(ids[1:], out[0].prompt_logprobs[1:], strict=True)]

    def _reload(self, weights: Iterator[tuple[str, Any]], version: int) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.version = version

    def load_full(self, buckets: list[Any], version: int) -> None:
        """Full weights from object-store buckets (each a list of (name, tensor)), streamed."""
        def stream() -> Iterator[tuple[str, Any]]:
            for ref in buckets:
                yield from ray.get(ref)

        self._reload(stream(), version)

    def load_adapter(self, adapter: dict[str, Any], scaling: float, full_names: list[str], version: int) -> None:
        """LoRA adapters only: merge each adapted layer's base weight with B·A here, reload.
        `adapter` maps a base weight's name to its (A, B); `full_names` lists every weight."""
        if not self.base:  # the first adapter sync: keep the base weights, as the checkpoint names them
            self.base = _checkpoint_tensors(self.model_dir)
        missing = [n for n in full_names if n not in self.base]
        if missing:
            raise KeyError(f"rollout engine has no weights named {missing[:3]}")

        def merged() -> Iterator[tuple[str, Any]]:
            for name in full_names:
                weight = self.base[name]
                if name in adapter:
                    a, b = adapter[name]
                    weight = weight + scaling * (b.to(weight) @ a.to(weight))
                yield name, weight

        with torch.no_grad():
            self._reload(merged(), version)


def _checkpoint_tensors(model_dir: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in sorted(set(safetensors_index(Path(model_dir)).values())):
        out.update(load_file(str(path)))
    return out
