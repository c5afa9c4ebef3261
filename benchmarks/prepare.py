"""Data preparation throughput: posttrain's prepare (local, one core; on a local Ray cluster of 1 and
2 CPUs) next to TRL's own dataset preparation of the same rows with the same tokenizer.

Data: `--rows` (default 200,000, the issue's size) synthetic multi-turn conversations, 1-4 exchanges
each, whose total length follows the packing benchmark (lognormal, median 64 tokens, sigma 1.5,
clipped to [8, 2048]; benchmarks/packing.py); max_seq_len 2048, offline packing. Tokenizer: the
tiny model's (`make tiny-model`) with a ChatML template carrying `{% generation %}` markers, so
both sides take their assistant masks from the template itself.

Arms, each in its own process (peak memory is that process tree's summed RSS, sampled every 0.2 s;
for Ray it includes the head's own daemons):
- local: `posttrain.prep.prepare.prepare`, pinned to one core;
- ray1 / ray2: `posttrain.training_lib.data.ray_prepare.run` (Ray Data) on a local Ray started with
  num_cpus 1 / 2, the whole arm (driver, Ray's daemons, workers) pinned to 1 / 2 cores, on 127.0.0.1
  (the clock starts after ray.init);
- trl: `datasets.Dataset.map` with `apply_chat_template(..., return_assistant_tokens_mask=True)`,
  then `trl.data_utils.pack_dataset(..., strategy="bfd")`, pinned to one core (num_proc 1).

Prints one JSON object: rows, tokens, and per arm seconds, rows_per_s, tokens_per_s, peak_rss_mb;
ray_scaling_1_to_2 and local_vs_trl. On a machine shared with other work the numbers are contended.

TRL and datasets come with the `bench` extra: `.venv/bin/pip install -c constraints.txt -e '.[bench]'`.
    python benchmarks/prepare.py [--rows 200000] [--arms local,ray1,ray2,trl]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GENERATION_CHATML = ("{% for message in messages %}{% if message['role'] == 'assistant' %}<|im_start|>assistant\n"
                     "{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}\n{% else %}"
                     "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = ("the river stone light garden number seven blue quickly answer question model data train small "
         "large field open close water paper table window").split()
MAX_LEN = 2048


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.exp(rng.normal(np.log(64), 1.5, size=n)), 8, 2048).astype(int)
    exchanges = rng.integers(1, 5, size=n)
    with path.open("w") as fh:
        for total, k in zip(lengths, exchanges, strict=True):
            words = rng.choice(WORDS, size=max(2 * k, int(total / 3.8)))  # the tiny tokenizer: ~3.8 tokens a word
            parts = np.array_split(words, 2 * k)
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": " ".join(p)}
                        for i, p in enumerate(parts)]
            fh.write(json.dumps({"messages": messages}) + "\n")


def bench_tokenizer(work: Path) -> Path:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(REPO / ".posttrain" / "models" / "tiny")
    tok.chat_template = GENERATION_CHATML
    tok.save_pretrained(work / "tokenizer")
    return work / "tokenizer"


def recipe_for(work: Path, data: Path, tokenizer: Path):
    from posttrain.recipe import parse_recipe

    return parse_recipe({"name": "bench-prepare", "paradigm": "sft", "model": {"base": str(tokenizer)},
                         "data": {"train": str(data), "eval": str(data), "max_seq_len": MAX_LEN,
                                  "validation": {"min_rows": 1, "max_overlong_fraction": 1.0}},
                         "storage": {"root": str(work / "storage")}}, base_dir=work)


def arm(name: str, work: Path, data: Path, tokenizer: Path) -> dict:
    """Runs in the arm's own process; returns seconds, rows and tokens of the train split."""
    out = work / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    if name in ("local", "trl"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    if name == "trl":
        from datasets import Dataset
        from transformers import AutoTokenizer
        from trl.data_utils import pack_dataset

        tok = AutoTokenizer.from_pretrained(tokenizer)
        start = time.perf_counter()
        ds = Dataset.from_json(str(data), cache_dir=str(work / "hf-cache"))
        ds = ds.map(lambda row: tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                                        return_assistant_tokens_mask=True),
                    remove_columns=["messages"], num_proc=None)
        packed = pack_dataset(ds, MAX_LEN, strategy="bfd")
        packed.save_to_disk(str(out))
        seconds = time.perf_counter() - start
        import pyarrow.compute as pc

        tokens = pc.sum(pc.list_value_length(packed.data.column("input_ids"))).as_py()
        return {"seconds": seconds, "rows": len(ds), "tokens": int(tokens)}
    recipe = recipe_for(work, data, tokenizer)
    if name == "local":
        from transformers import AutoTokenizer

        from posttrain.prep.prepare import prepare

        # transformers imports its modules (torch among them) on first use, seconds of it: load the
        # tokenizer once before the clock starts, as the TRL arm does (prepare loads it again, in ms).
        AutoTokenizer.from_pretrained(tokenizer)

        start = time.perf_counter()
        stats = prepare(recipe.model_copy(update={"data": recipe.data.model_copy(update={"eval": None})}), out)
    else:
        import ray

        from posttrain.training_lib.data import ray_prepare

        # A cluster of n CPUs is n cores: the driver, Ray's daemons and the workers all run on the
        # first n (unpinned, a 1-CPU cluster's tokenizer threads would use the machine's other core).
        cpus = int(name[-1])
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cpus]))
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback only (see ENVIRONMENT.md)
        ray.init(num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=str(work / "ray"),
                 logging_level="ERROR", log_to_driver=False)
        out.mkdir(parents=True)
        start = time.perf_counter()
        ray_prepare.run(recipe.model_copy(update={"data": recipe.data.model_copy(update={"eval": None})}),
                        f"file://{out}")
        stats = json.loads((out / "data" / "manifest.json").read_text())
        seconds = time.perf_counter() - start
        ray.shutdown()
        return {"seconds": seconds, "rows": stats["splits"]["train"]["rows"],
                "tokens": stats["splits"]["train"]["tokens"]}
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rows": stats["splits"]["train"]["rows"], "tokens": stats["splits"]["train"]["tokens"]}


def tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_arm(name: str, work: Path, data: Path, tokenizer: Path) -> dict:
    result_file = work / f"result-{name}.json"
    result_file.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, __file__, "--arm", name, "--work", str(work), "--data", str(data),
                             "--tokenizer", str(tokenizer)], cwd=REPO)
    peak = 0

    def sample() -> None:
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample)
    sampler.start()
    proc.wait()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"arm {name} failed with exit status {proc.returncode}")
    result = json.loads(result_file.read_text())
    result.update(rows_per_s=round(result["rows"] / result["seconds"], 1),
                  tokens_per_s=round(result["tokens"] / result["seconds"]), peak_rss_mb=round(peak / 2**20),
                  seconds=round(result["seconds"], 2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--arms", default="local,ray1,ray2,trl")
    parser.add_argument("--arm")
    parser.add_argument("--work")
    parser.add_argument("--data")
    parser.add_argument("--tokenizer")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.arm:  # one arm, in its own process
        result = arm(args.arm, Path(args.work), Path(args.data), Path(args.tokenizer))
        (Path(args.work) / f"result-{args.arm}.json").write_text(json.dumps(result))
        return
    home = Path(os.environ.get("POSTTRAIN_HOME") or REPO / ".posttrain")
    work = home / "bench" / "prepare"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = work / "rows.jsonl"
    write_rows(data, args.rows)
    tokenizer = bench_tokenizer(work)
    arms = {name: run_arm(name, work, data, tokenizer) for name in args.arms.split(",")}
    out = {"rows": args.rows, "max_seq_len": MAX_LEN, "cpus_on_machine": os.cpu_count(), **arms}
    if "ray1" in arms and "ray2" in arms:
        out["ray_scaling_1_to_2"] = round(arms["ray2"]["rows_per_s"] / arms["ray1"]["rows_per_s"], 2)
    if "local" in arms and "trl" in arms:
        out["local_vs_trl"] = round(arms["local"]["rows_per_s"] / arms["trl"]["rows_per_s"], 2)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
