"""The logit verifier: a parallelized model must compute what the plain model computes.

Both get the same random packed batch (two documents per row, so the document mask is exercised
too); the largest absolute difference of the logits must stay within the tolerance of the compute
precision. Used by the tests (CPU and GPU) on the tiny model; `collective_logits` must be called
on every rank, since the sharded forward gathers parameters.
"""

from __future__ import annotations

import torch

from posttrain.prep.packing import IGNORE

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


class LogitMismatch(AssertionError):
    pass


def random_batch(vocab: int, batch: int = 2, seq_len: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    split = seq_len // 3
    position_ids = torch.cat([torch.arange(split), torch.arange(seq_len - split)]).expand(batch, -1).contiguous()
    labels = input_ids.roll(-1, dims=1)
    labels[:, :4] = IGNORE  # a masked prompt
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


@torch.no_grad()
def collective_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: str = "cpu") -> torch.Tensor:
    """Logits of a CausalLMWithLoss (plain, FSDP2 or TP) on `batch`, as a float32 CPU tensor."""
    out = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device))
    if hasattr(model, "reshard"):
        # FSDP2 keeps the root's parameters gathered after a forward (its backward would need them at
        # once); without a backward they stay gathered, and model.parameters() would hand an
        # optimizer built next the gathered copies, which the next reshard drops: the embedding and
        # output layer would silently never train.
        model.reshard()
    if hasattr(out, "full_tensor"):
        out = out.full_tensor()
    return out.float().cpu()


def compare_logits(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    """Max |got - want|; raises LogitMismatch above the precision's tolerance."""
    diff = float((got - want).abs().max())
    tol = TOLERANCE[dtype]
    if not diff <= tol:
        raise LogitMismatch(f"sharded logits differ from the unsharded model's by {diff:.3g} (tolerance {tol:g} "
                            f"for {dtype})")
    return diff
