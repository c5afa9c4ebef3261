"""Deterministic synthetic chat data for the demo, the tests and the tiny tokenizer.

Conversations are small verifiable tasks (arithmetic, word reversal, counting, facts about a
made-up world) with system prompts, one to several turns, and a skewed length distribution (most
short, a few long), so packing has something to do. Nothing here is copied from a data set.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a concise assistant. Answer in one sentence.",
    "You are a careful tutor who explains each step.",
    None,  # some conversations have no system prompt
]
WORDS = ["river", "stone", "maple", "copper", "lantern", "harbor", "meadow", "violet", "ember", "falcon",
         "quartz", "willow", "summit", "pepper", "cobalt", "orchid", "tundra", "saffron", "glacier", "thistle"]
TOWNS = {"Avel": "Morrow", "Brisk": "Calder", "Dunmere": "Ostra", "Fennick": "Vale", "Halloway": "Quince",
         "Istra": "Pell", "Jorund": "Sable", "Kestrel": "Tamsin"}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    if rng.random() < 0.5:
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    a, b = max(a, b), min(a, b)
    return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}."


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(2, 5))
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


def _count(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    n = rng.randint(1, 10)
    question = f"How many times does the word appear: {' '.join([word] * n)}"
    return question, f"The word {word} appears {NUMBER_WORDS[n]} times."


def _capital(rng: random.Random) -> tuple[str, str]:
    land = rng.choice(sorted(TOWNS))
    return f"What is the capital of {land}?", f"The capital of {land} is {TOWNS[land]}."


def _story(rng: random.Random) -> tuple[str, str]:
    # The long tail: a story of many sentences.
    n = int(min(60, rng.lognormvariate(2.0, 0.9))) + 2
    sentences = []
    for _ in range(n):
        a, b = rng.sample(WORDS, 2)
        sentences.append(f"The {a} met the {b} near the {rng.choice(WORDS)}.")
    return f"Tell me a story about the {rng.choice(WORDS)}.", " ".join(sentences)


TASKS = [_arithmetic, _arithmetic, _reverse, _count, _capital, _story]


def conversation(rng: random.Random) -> dict:
    messages = []
    system = rng.choice(SYSTEM_PROMPTS)
    if system:
        messages.append({"role": "system", "content": system})
    turns = 1 + min(4, int(rng.expovariate(1.2)))
    for _ in range(turns):
        question, answer = rng.choice(TASKS)(rng)
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages}


def generate(out_dir: str | Path, train_rows: int = 400, eval_rows: int = 64, seed: int = 1234) -> dict[str, Path]:
    """Write train.jsonl and eval.jsonl under out_dir; same seed, same bytes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = {}
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        path = out / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as fh:
            for _ in range(rows):
                fh.write(json.dumps(conversation(rng), ensure_ascii=False) + "\n")
        paths[split] = path
    return paths


def corpus_text(jsonl: str | Path) -> list[str]:
    """Every message content of a chat JSONL file (the tiny tokenizer's training text)."""
    texts = []
    with Path(jsonl).open(encoding="utf-8") as fh:
        for line in fh:
            texts.extend(m["content"] for m in json.loads(line)["messages"])
    return texts
