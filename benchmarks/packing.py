"""Packing vs the usual padding collator: fill ratio, and real tokens/s of a training step.

Data: 20,000 synthetic samples, lengths lognormal (median 64 tokens, sigma 1.5) clipped to [8, 2048];
block 2048 (`--preset full` doubles lengths and block). Baseline: random micro-batches of 16 samples
padded to the longest. Throughput: forward + backward + AdamW step of a random-init Llama (hidden
256, intermediate 688, 4 layers, 4 heads, vocab 4096, float32) on the CPU, each arm in its own
process, over the same budget of real tokens after two warm-up steps. Packed blocks use
posttrain's per-document attention; padded batches use SDPA with the padding mask.

Prints one JSON object: fill_packed, fill_padded, tokens_per_s_packed, tokens_per_s_padded, speedup,
peak_rss_mb_packed, peak_rss_mb_padded (plus the settings).

With `--with-trl PYTHON` (an interpreter that has `trl` installed) it also runs TRL's `SFTTrainer` on the same
model, data and budget with packing (`bfd`, padding-free) in its own process, and adds trl_tokens_per_s_packed
and vs_trl (ours / TRL). TRL's padding-free batches carry no attention mask; on the CPU transformers turns their
restarting position_ids into a per-document mask for SDPA. The TRL arm imports nothing from posttrain, so the
interpreter can live in its own virtualenv (the `bench` extra), e.g.:

    python3.11 -m venv .posttrain/bench/trl-venv
    .posttrain/bench/trl-venv/bin/pip install torch==2.13.0          # first, the CPU build (not a CUDA one)
    echo "torch==2.13.0+cpu" > /tmp/torch-cpu.txt                    # keep it when trl's deps resolve
    .posttrain/bench/trl-venv/bin/pip install -c /tmp/torch-cpu.txt trl "transformers>=5.16,<6" numpy
    .venv/bin/python benchmarks/packing.py --with-trl .posttrain/bench/trl-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: the parent process may have neither datasets nor trl
    from datasets import Dataset
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import SFTConfig

PRESETS = {"small": {"block": 2048, "scale": 1}, "full": {"block": 4096, "scale": 2}}
BATCH = 16
WARMUP = 2  # steps left out of the timing in every arm


def sample_lengths(n: int, scale: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.normal(np.log(64), 1.5, size=n))
    return (np.clip(lengths, 8, 2048).astype(int) * scale).clip(max=2048 * scale)


def padded_batches(lengths: np.ndarray, seed: int = 0) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(len(lengths))
    return [order[i:i + BATCH] for i in range(0, len(order), BATCH)]


def fills(lengths: np.ndarray, block: int) -> tuple[float, float, list[list[int]]]:
    from posttrain.prep.packing import best_fit_decreasing

    bins = best_fit_decreasing(lengths.tolist(), block)
    fill_packed = lengths.sum() / (len(bins) * block)
    fill_padded = lengths.sum() / sum(len(b) * lengths[b].max() for b in padded_batches(lengths))
    return float(fill_packed), float(fill_padded), bins


def llama(attn: str) -> LlamaForCausalLM:
    """The benchmark's random-init model; plain transformers, so the TRL arm builds the same one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192,
                         attn_implementation=attn)
    return LlamaForCausalLM(config).float().train()


def build_model(attn: str) -> LlamaForCausalLM:
    from posttrain.training_lib.models.attention import register

    register()  # makes "posttrain_docs" a known attn_implementation
    return llama(attn)


def packed_steps(lengths: np.ndarray, bins: list[list[int]], block: int):
    """One packed block a step: ids, labels shifted inside each document, restarting positions."""
    import torch

    from posttrain.prep.packing import pack

    rng = np.random.default_rng(1)
    for b in rng.permutation(len(bins)):
        docs = [(rng.integers(0, 4096, size=int(lengths[i])).tolist(), [True] * int(lengths[i])) for i in bins[b]]
        [blk] = pack(docs, block, pad_id=0)
        yield ({"input_ids": torch.tensor([blk.input_ids]), "position_ids": torch.tensor([blk.position_ids])},
               torch.tensor([blk.labels]), int(lengths[bins[b]].sum()))


def padded_steps(lengths: np.ndarray):
    import torch

    rng = np.random.default_rng(1)
    for batch in padded_batches(lengths):
        width = int(lengths[batch].max())
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        labels = torch.full((len(batch), width), -100)
        for row, i in enumerate(batch):
            n = int(lengths[i])
            ids[row, :n] = torch.from_numpy(rng.integers(0, 4096, size=n))
            mask[row, :n] = 1
            labels[row, : n - 1] = ids[row, 1:n]
        yield {"input_ids": ids, "attention_mask": mask}, labels, int(lengths[batch].sum())


def run_arm(arm: str, preset: str, samples: int, budget: int) -> dict:
    import torch

    from posttrain.training_lib.losses.cross_entropy import summed_cross_entropy

    p = PRESETS[preset]
    lengths = sample_lengths(samples, p["scale"])
    model = build_model("posttrain_docs" if arm == "packed" else "sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    steps = packed_steps(lengths, fills(lengths, p["block"])[2], p["block"]) if arm == "packed" \
        else padded_steps(lengths)
    real, elapsed, counted = 0, 0.0, 0
    for i, (inputs, labels, n_real) in enumerate(steps):
        start = time.perf_counter()
        logits = model(**inputs, use_cache=False).logits
        loss = summed_cross_entropy(logits, labels) / (labels != -100).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= WARMUP:
            elapsed += time.perf_counter() - start
            real += n_real
            counted += 1
            if real >= budget:
                break
    return {"tokens_per_s": real / elapsed, "real_tokens": real, "steps": counted,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def trl_dataset(lengths: np.ndarray) -> Dataset:
    """The same samples as token ids, already tokenized, so SFTTrainer only adds labels and packs them."""
    from datasets import Dataset

    rng = np.random.default_rng(1)
    return Dataset.from_dict({"input_ids": [rng.integers(0, 4096, size=int(n)).tolist() for n in lengths]})


def trl_tokenizer() -> PreTrainedTokenizerFast:
    """SFTTrainer insists on a tokenizer for its pad/eos ids; the data is pre-tokenized, so a 2-word one will do."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1}  # pad 0, like posttrain's packed blocks
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")),
                                   pad_token="<pad>", eos_token="</s>")


def trl_step_timer(budget: int) -> TrainerCallback:
    """A TrainerCallback timing each optimizer step after the warm-up, stopping training once `budget` is met.

    Real tokens come from the Trainer's own count of the batches' input_ids (`include_num_input_tokens_seen`): a
    padding-free batch of one packed row is the row's documents concatenated, with no pad (pad_to_multiple_of=None).
    """
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.real, self.elapsed, self.steps = 0, 0.0, 0
            self._start, self._seen = 0.0, 0

        def on_step_begin(self, args, state, control, **kwargs):
            self._seen, self._start = state.num_input_tokens_seen, time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            elapsed = time.perf_counter() - self._start
            if state.global_step > WARMUP:  # global_step already counts this step
                self.elapsed += elapsed
                self.real += state.num_input_tokens_seen - self._seen
                self.steps += 1
                control.should_training_stop = self.real >= budget
            return control

    return StepTimer()


def trl_config(output_dir: str, block: int, budget: int) -> SFTConfig:
    from trl import SFTConfig

    return SFTConfig(
        output_dir=output_dir, report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
        use_cpu=True, dataloader_num_workers=0, per_device_train_batch_size=1, seed=0,
        max_length=block, packing=True, packing_strategy="bfd", padding_free=True, pad_to_multiple_of=None,
        max_steps=WARMUP + budget,  # never the limit: a step has at least one token, the callback stops first
        include_num_input_tokens_seen="all",
        # Same step as posttrain's arms: float32 (TRL defaults to bf16), no recomputation (TRL defaults to
        # gradient checkpointing), plain AdamW at a constant 1e-4 with torch's weight decay and no clipping.
        bf16=False, gradient_checkpointing=False, optim="adamw_torch", learning_rate=1e-4,
        lr_scheduler_type="constant", weight_decay=0.01, max_grad_norm=0.0,
    )


def run_trl_arm(preset: str, samples: int, budget: int) -> dict:
    """TRL's SFTTrainer with bfd packing; imports nothing from posttrain (it may run in another virtualenv)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # model, tokenizer and data are all built here
    import trl
    from trl import SFTTrainer

    block = PRESETS[preset]["block"]
    timer = trl_step_timer(budget)
    with tempfile.TemporaryDirectory() as out:
        trainer = SFTTrainer(model=llama("sdpa"), args=trl_config(out, block, budget), callbacks=[timer],
                             train_dataset=trl_dataset(sample_lengths(samples, PRESETS[preset]["scale"])),
                             processing_class=trl_tokenizer())
        rows = trainer.train_dataset["seq_lengths"]
        trainer.train()
    return {"tokens_per_s": timer.real / timer.elapsed, "real_tokens": timer.real, "steps": timer.steps,
            "fill": sum(map(sum, rows)) / (len(rows) * block), "trl_version": trl.__version__,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(python: str, arm: str, args: argparse.Namespace) -> dict:
    """One arm in a fresh process, so arms share no threads, caches or allocator state."""
    proc = subprocess.run([python, __file__, "--arm", arm, "--preset", args.preset, "--samples", str(args.samples),
                           "--budget", str(args.budget)], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{arm} arm failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def trl_summary(ours: dict, trl: dict) -> dict:
    return {"trl_tokens_per_s_packed": round(trl["tokens_per_s"], 1),
            "vs_trl": round(ours["tokens_per_s"] / trl["tokens_per_s"], 2),
            "fill_trl": round(trl["fill"], 4), "peak_rss_mb_trl": round(trl["peak_rss_mb"], 1),
            "real_tokens_trl": trl["real_tokens"], "trl_version": trl["trl_version"],
            "attention_trl": "sdpa + per-document mask from position_ids (padding-free)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--budget", type=int, default=20_000, help="real tokens per arm (after warm-up)")
    parser.add_argument("--with-trl", metavar="PYTHON", help="also run TRL's SFTTrainer (bfd packing) with this "
                        "interpreter, which must have trl installed")
    parser.add_argument("--arm", choices=["packed", "padded", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:  # child process: one arm
        result = run_trl_arm(args.preset, args.samples, args.budget) if args.arm == "trl" \
            else run_arm(args.arm, args.preset, args.samples, args.budget)
        print(json.dumps(result))
        return
    lengths = sample_lengths(args.samples, PRESETS[args.preset]["scale"])
    fill_packed, fill_padded, _ = fills(lengths, PRESETS[args.preset]["block"])
    arms = {arm: run_child(sys.executable, arm, args) for arm in ("packed", "padded")}
    print(json.dumps({
        "fill_packed": round(fill_packed, 4),
        "fill_padded": round(fill_padded, 4),
        "tokens_per_s_packed": round(arms["packed"]["tokens_per_s"], 1),
        "tokens_per_s_padded": round(arms["padded"]["tokens_per_s"], 1),
        "speedup": round(arms["packed"]["tokens_per_s"] / arms["padded"]["tokens_per_s"], 2),
        "peak_rss_mb_packed": round(arms["packed"]["peak_rss_mb"], 1),
        "peak_rss_mb_padded": round(arms["padded"]["peak_rss_mb"], 1),
        **(trl_summary(arms["packed"], run_child(args.with_trl, "trl", args)) if args.with_trl else {}),
        "preset": args.preset, "samples": args.samples, "block": PRESETS[args.preset]["block"],
        "real_tokens_packed": arms["packed"]["real_tokens"], "real_tokens_padded": arms["padded"]["real_tokens"],
        "attention_packed": "posttrain_docs (per-document SDPA)", "attention_padded": "sdpa + padding mask",
    }))


if __name__ == "__main__":
    main()
