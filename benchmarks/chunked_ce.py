"""Peak memory of the cross-entropy over a large vocabulary: naive logits vs posttrain's chunked loss.

Each arm runs in its own process on the same inputs (hidden states [tokens × hidden], output
projection [vocab × hidden], labels; float32, seed 0): loss, then gradients w.r.t. the hidden states
and the projection. Peak memory is the growth of peak RSS over the RSS just before the loss on the
CPU (CUDA peak allocated on a GPU). The gradients are written to a scratch folder under
$POSTTRAIN_HOME and compared by the parent.

Prints one JSON object: {"vocab", "tokens", "hidden", "peak_mb_naive", "peak_mb_chunked", "ratio",
"max_abs_diff_loss", "max_abs_diff_grad", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def run_arm(arm: str, vocab: int, tokens: int, hidden: int, chunk: int, out: Path) -> dict:
    import torch
    import torch.nn.functional as F

    from posttrain.training_lib.losses.chunked import chunked_cross_entropy

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    h = torch.randn(tokens, hidden, device=device).mul_(0.05).requires_grad_()
    w = torch.randn(vocab, hidden, device=device).mul_(0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device)
    labels[: tokens // 10] = -100  # some positions don't train, as in real batches
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb()
    if arm == "naive":
        loss = F.cross_entropy(h @ w.t(), labels, ignore_index=-100, reduction="sum")
    else:
        loss = chunked_cross_entropy(h, w, labels, chunk_size=chunk)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    torch.save({"loss": loss.detach().cpu(), "grad_h": h.grad.cpu(), "grad_w": w.grad.cpu()}, out / f"{arm}.pt")
    return {"peak_mb": peak, "device": device}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--arm", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.vocab, args.tokens, args.hidden, args.chunk, Path(args.out))))
        return

    import torch

    out = Path(os.environ.get("POSTTRAIN_HOME") or REPO / ".posttrain") / "bench" / "chunked_ce"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    arms = {}
    try:
        for arm in ("naive", "chunked"):
            proc = subprocess.run([sys.executable, __file__, "--arm", arm, "--vocab", str(args.vocab), "--tokens",
                                   str(args.tokens), "--hidden", str(args.hidden), "--chunk", str(args.chunk),
                                   "--out", str(out)], capture_output=True, text=True, check=True)
            arms[arm] = json.loads(proc.stdout.strip().splitlines()[-1])
        naive, chunked = torch.load(out / "naive.pt"), torch.load(out / "chunked.pt")
        diff_grad = max(float((naive[k] - chunked[k]).abs().max()) for k in ("grad_h", "grad_w"))
        result = {
            "vocab": args.vocab, "tokens": args.tokens, "hidden": args.hidden,
            "peak_mb_naive": round(arms["naive"]["peak_mb"], 1),
            "peak_mb_chunked": round(arms["chunked"]["peak_mb"], 1),
            "ratio": round(arms["chunked"]["peak_mb"] / arms["naive"]["peak_mb"], 4),
            "max_abs_diff_loss": float((naive["loss"] - chunked["loss"]).abs()),
            "max_abs_diff_grad": diff_grad,
            "loss": float(naive["loss"]), "chunk": args.chunk, "device": arms["naive"]["device"],
            # Both arms hold the projection's gradient ([vocab × hidden] float32); it is in both peaks.
            "weight_grad_mb": round(args.vocab * args.hidden * 4 / 2**20, 1),
        }
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
