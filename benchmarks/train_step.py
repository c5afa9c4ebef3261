"""Training-step throughput and MFU of posttrain's own training stack on one device.

A random-init Llama (seed 0) is saved as safetensors under $POSTTRAIN_HOME/bench/train_step, then
each arm runs in a fresh process the pieces a training job runs: `make_plan` for the recipe,
`build_parallel_model` (meta device → activation checkpointing / compile → FSDP2 → sharded load),
AdamW, and per step forward + chunked cross-entropy + backward, `clip_grad_norm`, optimizer step.
The batch is one packed block per micro-batch: documents of `--doc-len` tokens back to back, so
the attention is the per-document one training uses (eager arms: posttrain's per-document SDPA;
compiled arms: transformers' SDPA with the packed-document mask, as the plan picks).

Arms: `eager`, `compile`, `eager_ac` (activation checkpointing), `compile_ac`. On a GPU the
precision is bf16 mixed (fp32 master weights), on the CPU fp32.

Timing: `--warmup` steps (compile happens there), then `--steps` timed steps with a device
synchronize around each; the median step time is reported. MFU = achieved FLOP/s over the device's
dense peak for the precision (flops.py's table), with the model FLOPs per token from
`training_flops` (the same count the training metrics use: 6N plus causal attention).

Prints one JSON object: {"device", "model", "params", "seq_len", "micro_batch", "arms": {arm:
{"step_s", "tokens_per_s", "mfu", "peak_mem_mb", "loss_first", "loss_last"}}, "flops_per_token",
"peak_tflops"}. Everything it writes is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESETS = {
    # Llama-3.2-1B's shape (untied output layer): what a single-GPU recipe fine-tunes.
    "1b": {"hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "intermediate": 8192, "vocab": 128256},
    # Small enough for 2 CPU cores in a minute or two.
    "small": {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 2, "intermediate": 688, "vocab": 8192},
}
ARMS = {"eager": (False, False), "compile": (True, False), "eager_ac": (False, True), "compile_ac": (True, True)}


def write_model(out: Path, preset: dict, seq_len: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=preset["vocab"], hidden_size=preset["hidden"],
                         intermediate_size=preset["intermediate"], num_hidden_layers=preset["layers"],
                         num_attention_heads=preset["heads"], num_key_value_heads=preset["kv_heads"],
                         head_dim=preset["hidden"] // preset["heads"], max_position_embeddings=seq_len,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16)  # bf16 on disk: half the file to write
    model.save_pretrained(out / "model")
    return {"params": sum(p.numel() for p in model.parameters())}


def run_arm(out: Path, arm: str, args: argparse.Namespace) -> dict:
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    import torch
    import torch.distributed as dist

    from posttrain.planning import model_shape
    from posttrain.recipe import parse_recipe
    from posttrain.training_lib.flops import device_peak_flops, mfu, training_flops
    from posttrain.training_lib.grad_clip import clip_grad_norm
    from posttrain.training_lib.parallel.parallelize import build_parallel_model, make_mesh
    from posttrain.training_lib.parallel.plan import make_plan

    device = "cuda" if torch.cuda.is_available() else "cpu"
    compile_, ac = ARMS[arm]
    recipe = parse_recipe({
        "name": "bench-train-step", "paradigm": "sft", "model": {"base": str(out / "model")},
        "data": {"train": str(REPO / "dags/data/tiny-chat/train.jsonl"),
                 "eval": str(REPO / "dags/data/tiny-chat/eval.jsonl"), "max_seq_len": args.seq_len},
        "training": {"max_steps": 1, "sharding": "fsdp", "compile": compile_, "activation_checkpointing": ac,
                     "precision": "auto", "micro_batch_size": args.micro_batch},
        "compute": {"provider": "local", "workers": 1, "gpus_per_worker": 1 if device == "cuda" else 0},
        "storage": {"root": str(out / "storage")},
    }, base_dir=out)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{out / f'store-{arm}'}",
                            rank=0, world_size=1)
    try:
        plan = make_plan(recipe, 1, device)
        model, _ = build_parallel_model(recipe, plan, make_mesh(plan, device))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device == "cuda")  # as runtime.build_model
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, PRESETS[args.preset]["vocab"], (args.micro_batch, args.seq_len), generator=g)
        position_ids = (torch.arange(args.seq_len) % args.doc_len).expand(args.micro_batch, -1)
        labels = torch.roll(ids, -1, dims=1)
        labels[:, args.doc_len - 1::args.doc_len] = -100  # no target across a document boundary
        batch = {"input_ids": ids.to(device), "position_ids": position_ids.contiguous().to(device),
                 "labels": labels.to(device)}
        targets = int((labels != -100).sum())

        def sync() -> None:
            if device == "cuda":
                torch.cuda.synchronize()

        times, losses = [], []
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for i in range(args.warmup + args.steps):
            sync()
            start = time.perf_counter()
            loss = model(**batch)
            (loss / targets).backward()
            clip_grad_norm(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
            losses.append(float(loss) / targets)
        step_s = statistics.median(times)
        tokens_per_s = args.micro_batch * args.seq_len / step_s
        flops = training_flops(model_shape(recipe), args.seq_len).total  # causal attention over the block
        peak = device_peak_flops(device, "bfloat16" if plan.param_dtype == "bfloat16" else "float32")
        return {"step_s": round(step_s, 4), "tokens_per_s": round(tokens_per_s, 1),
                "mfu": None if (m := mfu(tokens_per_s, flops, peak)) is None else round(m, 4),
                "peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None,
                "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
                "attention": "sdpa+mask" if compile_ else "per-document sdpa", "plan": plan.as_dict(),
                "flops_per_token": flops, "peak_tflops": None if peak is None else peak / 1e12}
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: 1b on a GPU, small on the CPU")
    parser.add_argument("--seq-len", type=int, help="default: 4096 on a GPU, 512 on the CPU")
    parser.add_argument("--doc-len", type=int, help="tokens per packed document (default: an eighth of a block)")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--arm", choices=sorted(ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.arm:  # child process
        print(json.dumps(run_arm(Path(args.out), args.arm, args)))
        return

    import torch  # the parent only asks what the device is

    gpu = torch.cuda.is_available()
    args.preset = args.preset or ("1b" if gpu else "small")
    args.seq_len = args.seq_len or (4096 if gpu else 512)
    args.doc_len = min(args.doc_len or args.seq_len // 8, args.seq_len)
    home = Path(os.environ.get("POSTTRAIN_HOME", REPO / ".posttrain"))
    out = home / "bench" / "train_step"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    env = {**os.environ, "POSTTRAIN_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "GLOO_SOCKET_IFNAME": "lo", "TORCHINDUCTOR_CACHE_DIR": str(out / "inductor"), "TMPDIR": str(out),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    try:
        info = write_model(out, PRESETS[args.preset], args.seq_len)
        arms = {}
        for arm in args.arms.split(","):
            cmd = [sys.executable, __file__, "--arm", arm, "--out", str(out), "--preset", args.preset,
                   "--seq-len", str(args.seq_len), "--doc-len", str(args.doc_len),
                   "--micro-batch", str(args.micro_batch), "--warmup", str(args.warmup), "--steps", str(args.steps)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                arms[arm] = {"error": done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]}
                print(done.stderr[-3000:], file=sys.stderr)
                continue
            arms[arm] = json.loads(done.stdout.strip().splitlines()[-1])
        # The same for every arm: reported once.
        flops = next((a["flops_per_token"] for a in arms.values() if "flops_per_token" in a), None)
        peak = next((a["peak_tflops"] for a in arms.values() if "peak_tflops" in a), None)
        for a in arms.values():
            a.pop("flops_per_token", None), a.pop("peak_tflops", None)
        print(json.dumps({
            "device": torch.cuda.get_device_name() if gpu else "cpu", "model": args.preset, **info,
            "seq_len": args.seq_len, "doc_len": args.doc_len, "micro_batch": args.micro_batch,
            "flops_per_token": flops, "peak_tflops": peak,
            "arms": arms}))
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
