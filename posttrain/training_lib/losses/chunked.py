"""Cross-entropy from final hidden states, a chunk of positions at a time.

The [tokens × vocab] logits are never materialized whole, in forward or in backward: each chunk's
logits are computed, turned into its loss and its gradients at once (softmax minus one-hot), and
dropped. What stays are the gradients w.r.t. the hidden states ([tokens × hidden]) and the output
projection ([vocab × hidden]), which autograd needs anyway. Positions that don't train are dropped
before the projection. Same loss and gradients as the naive path (float32 accumulation).
"""

from __future__ import annotations

import torch

from posttrain.prep.packing import IGNORE


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                chunk_size: int) -> torch.Tensor:
        need_weight_grad = weight.requires_grad
        acc = torch.promote_types(hidden.dtype, torch.float32)  # at least float32 for softmax and sums
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight_grad else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size]
            t = targets[start:start + chunk_size]
            logits = (h @ weight.t()).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            rows = torch.arange(t.shape[0], device=t.device)
            total += (lse - logits[rows, t]).sum()
            # d(sum of losses)/d(logits) = softmax - onehot, computed in place of the logits.
            grad_logits = logits.sub_(lse.unsqueeze(-1)).exp_()
            grad_logits[rows, t] -= 1.0
            grad_hidden[start:start + chunk_size] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t(), h.to(acc))  # in place: no [vocab × hidden] temporary
            del logits, grad_logits
        ctx.save_for_backward(grad_hidden, grad_weight if grad_weight is not None else torch.empty(0))
        ctx.need_weight_grad = need_weight_grad
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        # Scaled in place: each is used once, and a copy of the [vocab × hidden] one would double its memory.
        grad_hidden.mul_(grad_output.to(grad_hidden.dtype))
        weight_grad = grad_weight.mul_(grad_output).to(ctx.weight_dtype) if ctx.need_weight_grad else None
        return grad_hidden, weight_grad, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int = 1024) -> torch.Tensor:
    """Sum of token losses of `hidden` [..., H] projected by `weight` [V, H] against `labels` [...]
    (IGNORE positions skipped)."""
    keep = labels.reshape(-1) != IGNORE
    flat = hidden.reshape(-1, hidden.shape[-1])[keep]
    targets = labels.reshape(-1)[keep]
    if torch.is_grad_enabled() and (flat.requires_grad or weight.requires_grad):
        return _ChunkedCrossEntropy.apply(flat, weight, targets, chunk_size)
    # Scoring only (evaluation): the same chunks, no gradient buffers.
    acc = torch.promote_types(hidden.dtype, torch.float32)
    total = torch.zeros((), dtype=acc, device=hidden.device)
    for start in range(0, flat.shape[0], chunk_size):
        logits = (flat[start:start + chunk_size] @ weight.t()).to(acc)
        total += torch.nn.functional.cross_entropy(logits, targets[start:start + chunk_size], reduction="sum")
    return total
