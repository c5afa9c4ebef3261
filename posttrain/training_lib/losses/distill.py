"""Knowledge-distillation divergences between a student and a frozen teacher, from their final
hidden states, a chunk of positions at a time.

Each chunk projects both models' hidden states to logits, softens them by the temperature and
reduces them to the chunk's divergence; the chunk runs under activation checkpointing, so its
[chunk × vocab] logits are recomputed in backward instead of kept: neither model's
[tokens × vocab] logits ever exist whole. Only labelled (assistant) positions count. Scaled by T²
so gradients keep their size across temperatures (Hinton et al. 2015).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from posttrain.prep.packing import IGNORE

KINDS = ("forward_kl", "reverse_kl", "jsd")


def _divergence(s_logits: torch.Tensor, t_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Summed over positions, in float32 at least."""
    log_s = F.log_softmax(s_logits, dim=-1)
    log_t = F.log_softmax(t_logits, dim=-1)
    if kind == "forward_kl":  # KL(teacher ‖ student): mode-covering
        return (log_t.exp() * (log_t - log_s)).sum()
    if kind == "reverse_kl":  # KL(student ‖ teacher): mode-seeking
        return (log_s.exp() * (log_s - log_t)).sum()
    # Jensen-Shannon: both against the mixture m = (p_s + p_t) / 2.
    log_m = torch.logaddexp(log_s, log_t) - torch.log(torch.tensor(2.0, dtype=log_s.dtype, device=log_s.device))
    return 0.5 * ((log_s.exp() * (log_s - log_m)).sum() + (log_t.exp() * (log_t - log_m)).sum())


def _chunk(hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor, temperature: float,
           kind: str) -> torch.Tensor:
    acc = torch.promote_types(hs.dtype, torch.float32)
    s_logits = (hs @ ws.t()).to(acc) / temperature
    with torch.no_grad():
        t_logits = (ht @ wt.t()).to(acc) / temperature
    return _divergence(s_logits, t_logits, kind)


def distill_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
                 teacher_weight: torch.Tensor, labels: torch.Tensor, kind: str = "forward_kl",
                 temperature: float = 1.0, chunk_size: int = 1024) -> torch.Tensor:
    """Sum over labelled positions of T² · divergence(student, teacher); hidden [..., H], weights
    [V, H] (the teacher's hidden size may differ), labels [...] with IGNORE where nothing trains."""
    if kind not in KINDS:
        raise ValueError(f"distillation divergence {kind!r}: allowed " + ", ".join(KINDS))
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student vocabulary {student_weight.shape[0]} ≠ teacher vocabulary "
                         f"{teacher_weight.shape[0]}: distillation needs the same tokenizer")
    keep = labels.reshape(-1) != IGNORE
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])[keep]
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[keep].detach()
    total = torch.zeros((), dtype=torch.promote_types(hs.dtype, torch.float32), device=hs.device)
    for start in range(0, hs.shape[0], chunk_size):
        part = (hs[start:start + chunk_size], student_weight, ht[start:start + chunk_size], teacher_weight.detach(),
                temperature, kind)
        total = total + (checkpoint(_chunk, *part, use_reentrant=False) if torch.is_grad_enabled() else _chunk(*part))
    return total * temperature ** 2
