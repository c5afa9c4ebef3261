"""Packing vs the usual padding collator: fill ratio, and real tokens/s of a training step.

Data: 20,000 synthetic samples, lengths lognormal (median 64 tokens, sigma 1.5) clipped to [8, 2048];
block 2048 (`--preset full` doubles lengths and block). Baseline: random micro-batches of 16 samples
padded to the longest. Throughput: forward + backward + AdamW step of a random-init Llama (hidden
256, intermediate 688, 4 layers, 4 heads, vocab 4096, float32) on the CPU, each arm in its own
process, over the same budget of real tokens after two warm-up steps. Packed blocks use
posttrain's per-document attention; padded batches use SDPA with the padding mask.

Prints one JSON object: fill_packed, fill_padded, tokens_per_s_packed, tokens_per_s_padded, speedup,
peak_rss_mb_packed, peak_rss_mb_padded (plus the settings).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np

PRESETS = {"small": {"block": 2048, "scale": 1}, "full": {"block": 4096, "scale": 2}}
BATCH = 16


def sample_lengths(n: int, scale: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    lengths = np.exp(rng.normal(np.log(64), 1.5, size=n))
    return (np.clip(lengths, 8, 2048).astype(int) * scale).clip(max=2048 * scale)


def padded_batches(lengths: np.ndarray, seed: int = 0) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(len(lengths))
    return [order[i:i + BATCH] for i in range(0, len(order), BATCH)]


def fills(lengths: np.ndarray, block: int) -> tuple[float, float, list[list[int]]]:
    from posttrain.training_lib.data.packing import best_fit_decreasing

    bins = best_fit_decreasing(lengths.tolist(), block)
    fill_packed = lengths.sum() / (len(bins) * block)
    fill_padded = lengths.sum() / sum(len(b) * lengths[b].max() for b in padded_batches(lengths))
    return float(fill_packed), float(fill_padded), bins


def build_model(attn: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.training_lib.models.attention import register

    register()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192,
                         attn_implementation=attn)
    return LlamaForCausalLM(config).float().train()


def packed_steps(lengths: np.ndarray, bins: list[list[int]], block: int):
    """One packed block a step: ids, labels shifted inside each document, restarting positions."""
    import torch

    from posttrain.training_lib.data.packing import pack

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
        if i >= 2:  # two warm-up steps
            elapsed += time.perf_counter() - start
            real += n_real
            counted += 1
            if real >= budget:
                break
    return {"tokens_per_s": real / elapsed, "real_tokens": real, "steps": counted,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--budget", type=int, default=20_000, help="real tokens per arm (after warm-up)")
    parser.add_argument("--arm", choices=["packed", "padded"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:  # child process: one arm
        print(json.dumps(run_arm(args.arm, args.preset, args.samples, args.budget)))
        return
    lengths = sample_lengths(args.samples, PRESETS[args.preset]["scale"])
    fill_packed, fill_padded, _ = fills(lengths, PRESETS[args.preset]["block"])
    arms = {}
    for arm in ("packed", "padded"):
        out = subprocess.run([sys.executable, __file__, "--arm", arm, "--preset", args.preset, "--samples",
                              str(args.samples), "--budget", str(args.budget)],
                             capture_output=True, text=True, check=True).stdout
        arms[arm] = json.loads(out.strip().splitlines()[-1])
    print(json.dumps({
        "fill_packed": round(fill_packed, 4),
        "fill_padded": round(fill_padded, 4),
        "tokens_per_s_packed": round(arms["packed"]["tokens_per_s"], 1),
        "tokens_per_s_padded": round(arms["padded"]["tokens_per_s"], 1),
        "speedup": round(arms["packed"]["tokens_per_s"] / arms["padded"]["tokens_per_s"], 2),
        "peak_rss_mb_packed": round(arms["packed"]["peak_rss_mb"], 1),
        "peak_rss_mb_padded": round(arms["padded"]["peak_rss_mb"], 1),
        "preset": args.preset, "samples": args.samples, "block": PRESETS[args.preset]["block"],
        "real_tokens_packed": arms["packed"]["real_tokens"], "real_tokens_padded": arms["padded"]["real_tokens"],
        "attention_packed": "posttrain_docs (per-document SDPA)", "attention_padded": "sdpa + padding mask",
    }))


if __name__ == "__main__":
    main()
