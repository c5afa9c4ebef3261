"""Log-probabilities of the label tokens from final hidden states, a chunk of positions at a time,
their sums per packed sequence (what DPO compares and RL weighs), and those of packed preference
pairs.

Each chunk projects its hidden states to [chunk × vocab] logits, takes the log-softmax at the label
and drops the logits; the chunk runs under activation checkpointing, so backward recomputes them
instead of keeping them. Positions without a label (IGNORE) are skipped before the projection and
get log-probability 0, so summing over a sequence counts only its trained tokens.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from posttrain.prep.packing import IGNORE


def _chunk_logprobs(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    acc = torch.promote_types(h.dtype, torch.float32)
    logits = (h @ weight.t()).to(acc)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   chunk_size: int = 1024) -> torch.Tensor:
    """log p(label) at every position of `labels` [...] from `hidden` [..., H] and the output
    projection `weight` [V, H]; 0 where the label is IGNORE. Float32 at least."""
    flat_labels = labels.reshape(-1)
    keep = (flat_labels != IGNORE).nonzero().squeeze(-1)
    flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    targets = flat_labels.index_select(0, keep)
    grad = torch.is_grad_enabled() and (flat.requires_grad or weight.requires_grad)
    pieces = []
    for start in range(0, flat.shape[0], chunk_size):
        args = (flat[start:start + chunk_size], weight, targets[start:start + chunk_size])
        pieces.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False) if grad else _chunk_logprobs(*args))
    acc = torch.promote_types(hidden.dtype, torch.float32)
    out = torch.zeros(flat_labels.shape[0], dtype=acc, device=hidden.device)
    if pieces:
        out = out.index_put((keep,), torch.cat(pieces))
    # A fresh tensor, not a view: FSDP2 drops its pre-backward hook on a view that is later modified.
    return out.view(labels.shape).clone()


def sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Which packed sequence each position belongs to (0, 1, …, across the rows of the batch):
    a sequence starts where the position ids restart at 0."""
    starts = (position_ids.reshape(-1) == 0).long()
    starts[0] = 1
    return (starts.cumsum(0) - 1).view(position_ids.shape)


def sequence_logprobs(token_logps: torch.Tensor, position_ids: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Sum of the token log-probabilities of each packed sequence: [num_sequences]."""
    ids = sequence_ids(position_ids).reshape(-1)
    out = torch.zeros(num_sequences, dtype=token_logps.dtype, device=token_logps.device)
    return out.index_add(0, ids, token_logps.reshape(-1))


def pair_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor], num_sequences: int, pairs: int,
                  normalize: bool = False) -> torch.Tensor:
    """[pairs, 2] summed log-probs of the (chosen, rejected) completions of a packed pair batch
    (data/pairs.py's layout) under `model` (a CausalLMWithLoss); `normalize`: divided by each
    completion's token count (IPO's length-normalized form)."""
    token_logps = model(**batch, output="token_logprobs")
    sums = sequence_logprobs(token_logps, batch["position_ids"], num_sequences)[: 2 * pairs].view(pairs, 2)
    if not normalize:
        return sums
    counts = sequence_logprobs((batch["labels"] != IGNORE).to(sums.dtype), batch["position_ids"], num_sequences)
    return sums / counts[: 2 * pairs].view(pairs, 2).clamp(min=1)
