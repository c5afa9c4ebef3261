"""GRPO's evaluation: the trained model answers the eval prompts with vLLM (greedy) and the
recipe's reward functions score the answers; reward_mean is their weighted sum, averaged."""

from __future__ import annotations

from pathlib import Path

from posttrain.recipe import Recipe


def reward_metrics(recipe: Recipe, model_dir: Path, workspace: Path) -> tuple[dict, list[dict]]:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from posttrain.training_lib.data.loader import read_prompts
    from posttrain.training_lib.evaluation.generate import vllm_loopback_defaults
    from posttrain.training_lib.rl.rewards import RewardSpec, score
    from posttrain.training_lib.rl.rollout import stop_token_ids

    vllm_loopback_defaults()
    g = recipe.grpo
    prompts = read_prompts(workspace, "eval")[: recipe.evaluation.max_samples]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=recipe.data.max_seq_len + g.max_new_tokens,
              enforce_eager=True, seed=0, max_num_seqs=16)
    params = SamplingParams(temperature=0.0, max_tokens=g.max_new_tokens, stop_token_ids=stop_token_ids(tokenizer),
                            allowed_token_ids=list(range(len(tokenizer))))
    outputs = llm.generate([{"prompt_token_ids": p["ids"]} for p in prompts], params, use_tqdm=False)
    texts = [o.outputs[0].text for o in outputs]
    specs = [RewardSpec(r.name, r.weight, r.params, r.label) for r in g.rewards]
    scores = score(specs, texts, [p["messages"] for p in prompts], [p["answer"] for p in prompts])
    metrics = {"reward_mean": sum(scores["total"]) / len(texts), "eval_prompts": len(texts),
               **{f"reward/{k}": sum(v) / len(v) for k, v in scores.items() if k != "total"}}
    samples = [{"prompt": p["messages"], "answer": p["answer"], "generated": text, "reward": total}
               for p, text, total in zip(prompts, texts, scores["total"], strict=True)]
    return metrics, samples
