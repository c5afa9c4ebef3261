"""The rollout role: a vLLM engine that samples G completions per prompt and takes the policy's
weights after each update.

Weight sync: full weights arrive as a list of object-store buckets (each a few hundred MB at most)
and are streamed into vLLM's in-place reload one bucket at a time, so neither side ever holds a
second whole copy. With LoRA only the adapters travel: the engine keeps the base weights of the
adapted layers and merges W + scale · B·A itself before the reload. vLLM's reload is all-or-
nothing (a partial reload leaves stacked projections inconsistent), so every sync reloads every
tensor; the adapter path only saves the transfer.

Runs vLLM in-process (no engine subprocess), on 127.0.0.1, with a small KV cache on the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from posttrain.training_lib.evaluation.generate import vllm_loopback_defaults


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Where a reply ends: the chat template's end-of-turn token and the tokenizer's EOS."""
    return sorted(i for i in {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
                  if isinstance(i, int) and i >= 0)


class RolloutEngine:
    """One vLLM engine on `model_dir` in `dtype` (the policy's: rollout and policy precision match)."""

    def __init__(self, model_dir: str, dtype: str, max_model_len: int, vocab: int, stop_ids: list[int],
                 seed: int = 0):
        vllm_loopback_defaults()
        import logging

        from vllm import LLM

        # Each sync reloads every layer, and vLLM warns for each rotary embedding that it has no
        # weights to reload (it has none: its frequencies are computed): a line per layer per step.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)

        self.llm = LLM(model=model_dir, dtype=dtype, max_model_len=max_model_len, enforce_eager=True, seed=seed,
                       max_num_seqs=64)
        self.model_dir, self.vocab, self.stop_ids = model_dir, vocab, stop_ids
        self.base: dict[str, Any] = {}  # base weights of the LoRA-adapted layers (adapter sync)
        self.version = 0

    def generate(self, prompts: list[list[int]], n: int, temperature: float, max_tokens: int, seed: int) -> dict:
        """n completions of each prompt: token ids, the sampling policy's log-prob of each token,
        and whether it stopped by itself. Seeded per call, so a resumed run samples the same."""
        from vllm import SamplingParams

        params = [SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, logprobs=0, seed=seed + i,
                                 stop_token_ids=self.stop_ids, allowed_token_ids=list(range(self.vocab)))
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
        from vllm import SamplingParams

        out = self.llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                                use_tqdm=False)
        return [entry[tok].logprob for tok, entry in zip(ids[1:], out[0].prompt_logprobs[1:], strict=True)]

    def _reload(self, weights: Iterator[tuple[str, Any]], version: int) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.version = version

    def load_full(self, buckets: list[Any], version: int) -> None:
        """Full weights from object-store buckets (each a list of (name, tensor)), streamed."""
        import ray

        def stream() -> Iterator[tuple[str, Any]]:
            for ref in buckets:
                yield from ray.get(ref)

        self._reload(stream(), version)

    def load_adapter(self, adapter: dict[str, Any], scaling: float, full_names: list[str], version: int) -> None:
        """LoRA adapters only: merge each adapted layer's base weight with B·A here, reload.
        `adapter` maps a base weight's name to its (A, B); `full_names` lists every weight."""
        import torch

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
    from pathlib import Path

    from safetensors.torch import load_file

    from posttrain.training_lib.models.sharded_load import safetensors_index

    out: dict[str, Any] = {}
    for path in sorted(set(safetensors_index(Path(model_dir)).values())):
        out.update(load_file(str(path)))
    return out
