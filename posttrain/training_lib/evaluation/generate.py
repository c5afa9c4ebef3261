"""Generation with vLLM for the eval prompts, scored against the reference replies."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from posttrain.prep.chat import prompt_and_reference, prompt_ids
from posttrain.prep.prepare import read_jsonl
from posttrain.recipe import Recipe
from posttrain.training_lib.models.vllm_engine import make_engine, sampling_params, stop_token_ids


def generate_and_score(recipe: Recipe, model_dir: Path) -> tuple[dict, list[dict], dict[int, dict]]:
    """(metrics, samples, {line of the eval file: exact_match and the generation})."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows, lines = [], []
    for lineno, row in read_jsonl(recipe.data.eval):
        rows.append(prompt_and_reference(row["messages"]))
        lines.append(lineno)
        if len(rows) >= recipe.evaluation.max_samples:
            break
    prompts = [prompt_ids(tokenizer, msgs) for msgs, _ in rows]
    max_prompt = max(len(p) for p in prompts)
    llm = make_engine(model_dir, max_prompt + recipe.evaluation.max_new_tokens)
    params = sampling_params(len(tokenizer), stop_token_ids(tokenizer), temperature=0.0,
                             max_tokens=recipe.evaluation.max_new_tokens)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    samples, exact, per_line = [], 0, {}
    for line, (msgs, reference), out in zip(lines, rows, outputs, strict=True):
        text = out.outputs[0].text.strip()
        match = text == reference.strip()
        exact += match
        samples.append({"prompt": msgs, "reference": reference, "generated": text, "exact_match": match,
                        "generated_token_ids": list(out.outputs[0].token_ids)})
        per_line[line] = {"exact_match": float(match), "generated": text}
    return {"exact_match": exact / len(rows), "generated_samples": len(rows)}, samples, per_line
