"""GRPO's evaluation: the trained model answers the eval prompts with vLLM (greedy) and the
recipe's reward functions score the answers; reward_mean is their weighted sum, averaged."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from posttrain.recipe import Recipe
from posttrain.rewards import score
from posttrain.storage_fs import Store
from posttrain.training_lib.data.loader import read_prompts
from posttrain.training_lib.models.vllm_engine import make_engine, sampling_params, stop_token_ids


def reward_metrics(recipe: Recipe, model_dir: Path, workspace: Store) -> tuple[dict, list[dict], list[dict]]:
    """(metrics, samples, per prompt in prepared order: its reward_mean (weighted total), each
    reward and the generation)."""
    g = recipe.grpo
    prompts = read_prompts(workspace, "eval")[: recipe.evaluation.max_samples]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    llm = make_engine(model_dir, recipe.data.max_seq_len + g.max_new_tokens)
    params = sampling_params(len(tokenizer), stop_token_ids(tokenizer), temperature=0.0, max_tokens=g.max_new_tokens)
    outputs = llm.generate([{"prompt_token_ids": p["ids"]} for p in prompts], params, use_tqdm=False)
    texts = [o.outputs[0].text for o in outputs]
    scores = score(g.rewards, texts, [p["messages"] for p in prompts], [p["answer"] for p in prompts])
    metrics = {"reward_mean": sum(scores["total"]) / len(texts), "eval_prompts": len(texts),
               **{f"reward/{k}": sum(v) / len(v) for k, v in scores.items() if k != "total"}}
    samples = [{"prompt": p["messages"], "answer": p["answer"], "generated": text, "reward": total}
               for p, text, total in zip(prompts, texts, scores["total"], strict=True)]
    per_prompt = [{"reward_mean": float(scores["total"][i]), "generated": texts[i],
                   **{f"reward/{k}": float(v[i]) for k, v in scores.items() if k != "total"}}
                  for i in range(len(texts))]
    return metrics, samples, per_prompt
