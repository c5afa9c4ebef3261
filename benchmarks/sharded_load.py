"""Memory of loading the training model: the whole model in one process vs each rank loading its shard.

A random-init Llama (seed 0; default 168M parameters, 642 MiB float32) is saved as safetensors under
$POSTTRAIN_HOME/bench/sharded_load, then loaded by two arms, each in fresh processes:

- `full`: `load_for_training(recipe)` in one process, what a rank does that loads the whole model.
- `sharded`: `--world` ranks (default 2) in a gloo group on 127.0.0.1, recipe `training.sharding:
  fsdp`; each rank runs `build_parallel_model` (meta device → FSDP2 → `materialize`, which allocates
  the local shards and fills them with `safe_open(...).get_slice` reads) and reports its own numbers
  and `LoadReport`.

Memory is RSS growth over the RSS just before the load, after the imports (transformers' Llama,
accelerate, safetensors and posttrain's loading modules are imported before the baseline in both
arms). The peak is `ru_maxrss` (KiB on Linux). The parent imports no torch, so the children's
`ru_maxrss` does not start from a large parent's high-water mark. The measured window is the load
and then the first use of the weights: one read of every parameter (what a forward does) and one
in-place write (what an optimizer step does). The first use has to be in the window because
transformers 5's `from_pretrained` returns parameters that are views into a copy-on-write
(MAP_PRIVATE) mmap of the file: the load itself takes milliseconds and almost no RSS
(`full_load_only_peak_rss_mb`). The first read maps the file's pages (RssFile, clean page cache
that processes on one node share). The first write swaps each page for a private copy (RssAnon).
The file on disk is never modified.

The sharded ranks read through mmap as well. `get_slice` touches only the pages of the requested
rows, but `load_shards` keeps the file open until every parameter is loaded. So at its peak a rank
holds its shard (anonymous memory) and also the file pages of its rows (somewhat more than
`bytes_read`: the kernel maps the page-cache blocks around each touched page). Those file pages are
released when the file is closed. A sampler thread (every ~2 ms, from /proc/self/status) reports the
peaks of RssAnon and RssFile separately. The `*_after_first_write` keys give what each process still
holds at the end. The files were just written, so the reads come from the page cache, not the
disk: the load times measure memory copies and page faults, not I/O, and on a busy machine they are
noisy.

Prints one JSON object: {"params", "model_mb", "world", "full_load_peak_rss_mb",
"sharded_peak_rss_mb_per_rank", "sharded_bytes_read_mb_per_rank", "sharded_local_mb_per_rank",
"ratio_max_rank_vs_full", "load_seconds_full", "load_seconds_sharded", ...}; MiB throughout.
Everything it writes is under $POSTTRAIN_HOME/bench/sharded_load (default <repo>/.posttrain) and is
removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 2**20


def _status_mb() -> dict[str, float]:
    """Current RSS and its anonymous / file-backed parts, from /proc/self/status (Linux)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024  # kB
    return out


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _Sampler(threading.Thread):
    """Peaks of RssAnon and RssFile while the load runs (ru_maxrss only has their sum's peak)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks = {"RssAnon": 0.0, "RssFile": 0.0}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            for key, value in _status_mb().items():
                if key in self.peaks:
                    self.peaks[key] = max(self.peaks[key], value)
            self._done.wait(0.002)

    def stop(self) -> dict[str, float]:
        self._done.set()
        self.join()
        return self.peaks


def _preimport() -> None:
    """What the load would import on first use, so the baseline RSS includes the modules."""
    import accelerate  # noqa: F401
    import safetensors.torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    import posttrain.training_lib.models.loading  # noqa: F401
    import posttrain.training_lib.models.sharded_load  # noqa: F401


def _local_tensors(model: object) -> list:
    """The storage each parameter has in this process: a DTensor's local shard, else the tensor."""
    return [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]


def _measure(load, model_of) -> tuple[object, dict]:  # noqa: ANN001 - callables
    """Peak RSS growth over the RSS just before `load()`, after the load alone and through the
    first use of the weights: one read of every parameter (a forward reads them all) and one
    in-place write (an optimizer step; on a copy-on-write mapping it makes the page private)."""
    import torch

    sampler = _Sampler()
    base, maxrss_before = _status_mb(), _maxrss_mb()
    sampler.start()
    start = time.perf_counter()
    result = load()
    seconds = time.perf_counter() - start
    after_load, peak_load = _status_mb(), _maxrss_mb()
    tensors = _local_tensors(model_of(result))
    start = time.perf_counter()
    with torch.no_grad():
        for t in tensors:
            t.sum()
    read_seconds = time.perf_counter() - start
    after_read = _status_mb()
    with torch.no_grad():
        for t in tensors:
            t.mul_(1.0)
    after_write = _status_mb()
    peaks = sampler.stop()

    def grown(now: dict, key: str) -> float:
        return now[key] - base[key]

    return result, {
        "seconds": seconds, "first_read_seconds": read_seconds, "base_rss_mb": base["VmRSS"],
        "maxrss_before_mb": maxrss_before,
        "peak_rss_growth_mb": _maxrss_mb() - base["VmRSS"], "load_only_peak_rss_growth_mb": peak_load - base["VmRSS"],
        # Sampled peaks (a spike shorter than the period can be missed), over the same baseline.
        "peak_anon_mb": peaks["RssAnon"] - base["RssAnon"], "peak_file_mb": peaks["RssFile"] - base["RssFile"],
        "after_load": {"anon_mb": grown(after_load, "RssAnon"), "file_mb": grown(after_load, "RssFile")},
        "after_read": {"anon_mb": grown(after_read, "RssAnon"), "file_mb": grown(after_read, "RssFile")},
        "after_write": {"anon_mb": grown(after_write, "RssAnon"), "file_mb": grown(after_write, "RssFile")},
        "local_param_bytes": sum(t.numel() * t.element_size() for t in tensors),
    }


def write_model(out: Path, layers: int, hidden: int, intermediate: int, vocab: int, heads: int,
                world: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.recipe import parse_recipe

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         head_dim=hidden // heads, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(out / "model")  # transformers 5 always writes safetensors
    recipe = parse_recipe({
        "name": "bench-sharded-load", "paradigm": "sft", "model": {"base": str(out / "model")},
        "data": {"train": str(REPO / "dags/data/tiny-chat/train.jsonl"),
                 "eval": str(REPO / "dags/data/tiny-chat/eval.jsonl")},
        "training": {"max_steps": 1, "sharding": "fsdp"},
        "compute": {"provider": "local", "workers": world},
        "storage": {"root": str(out / "storage")},
    }, base_dir=out)
    (out / "recipe.json").write_text(recipe.model_dump_json())
    files = sorted(p.name for p in (out / "model").iterdir())
    file_bytes = sum(p.stat().st_size for p in (out / "model").glob("*.safetensors"))
    return {"params": params, "param_bytes": param_bytes, "file_bytes": file_bytes, "files": files}


def run_full(out: Path) -> dict:
    import torch

    _preimport()
    from posttrain.recipe import Recipe
    from posttrain.training_lib.models.loading import load_for_training

    recipe = Recipe.model_validate_json((out / "recipe.json").read_text())
    _, stats = _measure(lambda: load_for_training(recipe), lambda model: model)
    return {**stats, "threads": torch.get_num_threads()}


def run_rank(out: Path, rank: int, world: int) -> dict:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    import torch
    import torch.distributed as dist

    _preimport()
    from posttrain.recipe import Recipe
    from posttrain.training_lib.parallel.parallelize import build_parallel_model, make_mesh
    from posttrain.training_lib.parallel.plan import make_plan

    # The ranks share the machine's cores, as ranks on one node do.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=world)
    try:
        recipe = Recipe.model_validate_json((out / "recipe.json").read_text())
        plan = make_plan(recipe, world, "cpu")
        mesh = make_mesh(plan, "cpu")
        dist.barrier()  # both ranks start loading together
        (model, report), stats = _measure(lambda: build_parallel_model(recipe, plan, mesh), lambda r: r[0])
        kinds = sorted({type(p).__name__ for p in model.parameters()})
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return {**stats, "report": report.as_dict(), "plan": plan.strategy, "param_types": kinds,
            "threads": torch.get_num_threads()}


def _child_env(home: Path, out: Path) -> dict[str, str]:
    cache = home / "cache"
    return {**os.environ, "POSTTRAIN_HOME": str(home), "GLOO_SOCKET_IFNAME": "lo", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(cache / "huggingface"), "XDG_CACHE_HOME": str(cache),
            "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TMPDIR": str(out / "tmp"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def run_ranks(arm, env: dict, out: Path, world: int, timeout: float) -> list[dict]:  # noqa: ANN001
    """Start every rank's process at once; the first to fail (or the deadline) stops the others,
    which would otherwise wait in the gloo group for it."""
    logs = [(out / f"rank{r}.out", out / f"rank{r}.err") for r in range(world)]
    procs = []
    for r, (stdout, stderr) in enumerate(logs):
        with open(stdout, "w") as fo, open(stderr, "w") as fe:
            procs.append(subprocess.Popen(arm("rank", "--rank", str(r), "--world", str(world)), env=env,
                                          stdout=fo, stderr=fe))
    deadline = time.monotonic() + timeout
    try:
        while None in [p.poll() for p in procs]:  # a list: poll every process, each time
            failed = [r for r, p in enumerate(procs) if p.returncode]
            if failed:
                raise RuntimeError(f"rank {failed[0]} exited with {procs[failed[0]].returncode}:\n"
                                   + logs[failed[0]][1].read_text()[-4000:])
            if time.monotonic() > deadline:
                raise TimeoutError(f"the ranks did not finish in {timeout} s")
            time.sleep(0.2)
        for r, p in enumerate(procs):
            if p.returncode:
                raise RuntimeError(f"rank {r} exited with {p.returncode}:\n" + logs[r][1].read_text()[-4000:])
        return [_last_json(stdout.read_text()) for stdout, _ in logs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=600, help="seconds for each arm")
    parser.add_argument("--arm", choices=["write", "full", "rank"], help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.out:
        args.out = str(Path(args.out).resolve())
    if args.arm == "write":
        print(json.dumps(write_model(Path(args.out), args.layers, args.hidden, args.intermediate, args.vocab,
                                     args.heads, args.world)))
        return
    if args.arm == "full":
        print(json.dumps(run_full(Path(args.out))))
        return
    if args.arm == "rank":
        print(json.dumps(run_rank(Path(args.out), args.rank, args.world)))
        return

    # The parent stays light (no torch): each arm's process starts from a small high-water mark.
    home = Path(os.environ.get("POSTTRAIN_HOME") or REPO / ".posttrain").resolve()
    out = home / "bench" / "sharded_load"
    shutil.rmtree(out, ignore_errors=True)
    (out / "tmp").mkdir(parents=True)
    env = _child_env(home, out)

    def arm(name: str, *extra: str) -> list[str]:
        return [sys.executable, __file__, "--arm", name, "--out", str(out), *extra]

    try:
        written = _last_json(subprocess.run(
            arm("write", "--layers", str(args.layers), "--hidden", str(args.hidden), "--intermediate",
                str(args.intermediate), "--vocab", str(args.vocab), "--heads", str(args.heads), "--world",
                str(args.world)),
            env=env, capture_output=True, text=True, check=True, timeout=args.timeout).stdout)
        full = _last_json(subprocess.run(arm("full"), env=env, capture_output=True, text=True, check=True,
                                         timeout=args.timeout).stdout)
        ranks = run_ranks(arm, env, out, args.world, args.timeout)
    except subprocess.CalledProcessError as exc:
        sys.stderr.write(exc.stderr[-4000:])
        raise
    finally:
        shutil.rmtree(out, ignore_errors=True)

    def mb(value: float) -> float:
        return round(value, 1)

    def held(arm: dict) -> float:
        return arm["after_write"]["anon_mb"] + arm["after_write"]["file_mb"]

    per_rank = [r["peak_rss_growth_mb"] for r in ranks]
    result = {
        "params": written["params"], "model_mb": mb(written["param_bytes"] / MB), "world": args.world,
        # Peak RSS growth through the load and the first read and write of every parameter.
        "full_load_peak_rss_mb": mb(full["peak_rss_growth_mb"]),
        "sharded_peak_rss_mb_per_rank": [mb(v) for v in per_rank],
        "sharded_bytes_read_mb_per_rank": [mb(r["report"]["bytes_read"] / MB) for r in ranks],
        "sharded_local_mb_per_rank": [mb(r["report"]["local_bytes"] / MB) for r in ranks],
        "ratio_max_rank_vs_full": round(max(per_rank) / full["peak_rss_growth_mb"], 4),
        "load_seconds_full": round(full["seconds"], 2),
        "load_seconds_sharded": round(max(r["seconds"] for r in ranks), 2),
        # What each process holds once the weights were read and written once (the files closed).
        "full_rss_after_first_write_mb": mb(held(full)),
        "sharded_rss_after_first_write_mb_per_rank": [mb(held(r)) for r in ranks],
        "ratio_max_rank_vs_full_after_first_write": round(max(held(r) for r in ranks) / held(full), 4),
        # What those are made of. The full load maps the file copy-on-write and returns at once:
        # its RSS grows when the weights are first read (file pages) and written (private copies).
        "full_load_only_peak_rss_mb": mb(full["load_only_peak_rss_growth_mb"]),
        "sharded_load_only_peak_rss_mb_per_rank": [mb(r["load_only_peak_rss_growth_mb"]) for r in ranks],
        "full_first_read_seconds": round(full["first_read_seconds"], 2),
        "full_param_mb_held": mb(full["local_param_bytes"] / MB),
        "full_peak_anon_mb": mb(full["peak_anon_mb"]), "full_peak_file_mb": mb(full["peak_file_mb"]),
        "sharded_peak_anon_mb_per_rank": [mb(r["peak_anon_mb"]) for r in ranks],
        "sharded_peak_file_mb_per_rank": [mb(r["peak_file_mb"]) for r in ranks],
        "full_anon_file_mb_after": {k: [mb(full[k]["anon_mb"]), mb(full[k]["file_mb"])]
                                    for k in ("after_load", "after_read", "after_write")},
        "sharded_anon_file_mb_after_rank0": {k: [mb(ranks[0][k]["anon_mb"]), mb(ranks[0][k]["file_mb"])]
                                             for k in ("after_load", "after_read", "after_write")},
        "base_rss_mb_full": mb(full["base_rss_mb"]), "base_rss_mb_per_rank": [mb(r["base_rss_mb"]) for r in ranks],
        "param_types_sharded": ranks[0]["param_types"], "strategy": ranks[0]["plan"],
        "safetensors_files": [f for f in written["files"] if f.endswith(".safetensors")],
        "threads_full": full["threads"], "threads_per_rank": ranks[0]["threads"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
