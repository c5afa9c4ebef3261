"""Deterministic synthetic chat data for the demo, the tests and the tiny tokenizer.

Formats: `chat` (dags/data/tiny-chat), `preference` (dags/data/tiny-preference: the same tasks as
one-turn prompts with a right and a wrong reply) and `prompt` (dags/data/tiny-prompts: one-turn
prompts with their reference answer, for RL).

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


def _wrong_answer(rng: random.Random, task: str, answer: str) -> str:
    """A reply of the same form as `answer` that is wrong: what the rejected side of a pair says."""
    if task == "arithmetic":
        head, _, value = answer.rstrip(".").rpartition(" is ")
        right = int(value)
        wrong = rng.choice([right + d for d in (1, 2, 3, 5, 10)] + [right - d for d in (1, 2, 3, 5) if right >= d])
        return f"{head} is {wrong}."
    if task == "reverse":
        words = answer.split()
        return " ".join(reversed(words))  # the words back in their original order: not reversed
    if task == "count":
        current = next(w for w in NUMBER_WORDS if f" {w} times" in answer)
        other = rng.choice([w for w in NUMBER_WORDS[1:] if w != current])
        return answer.replace(f" {current} times", f" {other} times")
    land = answer.split()[3]
    other = rng.choice([t for t in TOWNS.values() if t != TOWNS[land]])
    return answer.replace(TOWNS[land], other)


PAIR_TASKS = {"arithmetic": _arithmetic, "reverse": _reverse, "count": _count, "capital": _capital}


def preference_pair(rng: random.Random) -> dict:
    """A one-turn prompt, the right reply (chosen) and a wrong one of the same form (rejected)."""
    system = rng.choice(SYSTEM_PROMPTS)
    task = rng.choice(sorted(PAIR_TASKS))
    question, answer = PAIR_TASKS[task](rng)
    rejected = _wrong_answer(rng, task, answer)
    if rejected == answer:  # a reversal of a palindromic list; never happens with distinct words
        rejected = answer + " " + answer
    prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": answer}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def prompt_row(rng: random.Random) -> dict:
    """A one-turn prompt with its verifiable reference answer (the RL format)."""
    system = rng.choice(SYSTEM_PROMPTS)
    question, answer = PAIR_TASKS[rng.choice(sorted(PAIR_TASKS))](rng)
    prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return {"prompt": prompt, "answer": answer}


ROW_MAKERS = {"chat": conversation, "preference": preference_pair, "prompt": prompt_row}


def generate(out_dir: str | Path, train_rows: int = 400, eval_rows: int = 64, seed: int = 1234,
             data_format: str = "chat") -> dict[str, Path]:
    """Write train.jsonl and eval.jsonl of `data_format` under out_dir; same seed, same bytes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    make = ROW_MAKERS[data_format]
    paths = {}
    seen: set[str] = set()  # across splits too: no eval prompt is a train prompt
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        path = out / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as fh:
            written = 0
            while written < rows:
                line = json.dumps(make(rng), ensure_ascii=False)
                # Prompts repeat easily (eight lands, four system prompts): RL data gets unique ones.
                if data_format == "prompt" and line in seen:
                    continue
                seen.add(line)
                fh.write(line + "\n")
                written += 1
        paths[split] = path
    return paths


def corpus_text(jsonl: str | Path) -> list[str]:
    """Every message content of a chat JSONL file (the tiny tokenizer's training text)."""
    texts = []
    with Path(jsonl).open(encoding="utf-8") as fh:
        for line in fh:
            texts.extend(m["content"] for m in json.loads(line)["messages"])
    return texts
