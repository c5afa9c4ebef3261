"""GRPO: group-normalized advantages and the clipped-ratio policy loss with a KL penalty to a
reference model (DeepSeekMath, Shao et al. 2024, arXiv:2402.03300).

GRPO drops PPO's value model: each prompt is sampled G times and a completion's advantage is its
reward relative to the other completions of the same prompt. The per-token objective is PPO's
clipped surrogate, minus beta × KL(policy ‖ reference) estimated per token with Schulman's k3
estimator (http://joschu.net/blog/kl-approx.html). Two aggregations over tokens are offered: the
original per-sequence mean, and the token mean of DAPO (Yu et al. 2025, arXiv:2503.14476), which weighs
every token the same so that long completions are not under-weighted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Aggregation = Literal["token_mean", "sequence_mean"]
AGGREGATIONS: tuple[str, ...] = ("token_mean", "sequence_mean")


def group_advantages(rewards: torch.Tensor, group_size: int, normalize_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """Advantage of each completion: (r − mean of its group) / (std of its group + eps), groups being
    ``group_size`` consecutive completions of one prompt; without ``normalize_std`` just r − mean
    (Dr. GRPO, Liu et al. 2025, argues the std division biases towards too-easy and too-hard prompts).

    The std is the population std of the group (``unbiased=False``), the std of the G rewards as
    DeepSeekMath writes it: defined for G = 1 and the same scale whatever G. A group whose rewards are
    all equal carries no signal and gets exactly 0 (not rounding noise divided by eps)."""
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D [num_prompts × group_size], "
                         f"got {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_advantages: group_size must be >= 1, got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"group_advantages: {rewards.numel()} rewards is not a multiple of group_size {group_size}")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        advantages = advantages / (grouped.std(dim=1, unbiased=False, keepdim=True) + eps)
    all_equal = (grouped == grouped[:, :1]).all(dim=1, keepdim=True)
    return torch.where(all_equal, torch.zeros_like(advantages), advantages).view(-1)


@dataclass
class GRPOOutput:
    loss: torch.Tensor  # scalar, differentiable
    clip_fraction: torch.Tensor  # masked tokens whose clipped branch was chosen (no policy gradient there)
    kl: torch.Tensor | None  # mean k3 over masked tokens; None without reference log-probs
    ratio_mean: torch.Tensor  # mean π/π_old over masked tokens (1 when on-policy)
    advantage_mean: torch.Tensor
    advantage_std: torch.Tensor

    def metrics(self) -> dict[str, float]:
        out = {"loss": float(self.loss.detach()), "clip_fraction": float(self.clip_fraction),
               "ratio_mean": float(self.ratio_mean), "advantage_mean": float(self.advantage_mean),
               "advantage_std": float(self.advantage_std)}
        if self.kl is not None:
            out["kl"] = float(self.kl)
        return out


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float = 0.2, kl_beta: float = 0.04,
              aggregation: Aggregation = "token_mean", clip_eps_high: float | None = None,
              normalizer: float | None = None) -> GRPOOutput:
    """Clipped-ratio GRPO loss.

    Per-token inputs are [B, T]: ``logprobs`` of the sampled tokens under the policy being trained
    (differentiable), ``old_logprobs`` under the policy that sampled them and ``ref_logprobs`` under
    the reference (both treated as constants); ``mask`` marks completion tokens; ``advantages`` is [B].

    With ratio = exp(logp − old), the objective per token is min(ratio·A, clip(ratio, 1 − clip_eps,
    1 + clip_eps_high)·A) − kl_beta·k3, with k3 = exp(ref − logp) − (ref − logp) − 1 (Schulman: unbiased
    and always >= 0, unlike log(π/π_ref)). ``clip_eps_high`` defaults to ``clip_eps``; DAPO's
    "clip-higher" sets it larger so unlikely tokens can gain probability. ``kl_beta=0`` drops the
    reference (``ref_logprobs`` may then be None; given, its KL is still reported).

    The loss is −objective aggregated over masked tokens: ``token_mean`` divides the sum over all
    masked tokens by their number (DAPO), ``sequence_mean`` averages each sequence's token mean over
    the sequences that have a completion token (DeepSeekMath). ``normalizer`` replaces the local
    divisor (masked tokens, or sequences) when a batch is split into micro-batches or across ranks:
    pass the whole batch's count so every token (or sequence) weighs the same, as the SFT loss does."""
    if logprobs.dim() != 2:
        raise ValueError(f"grpo_loss: logprobs must be [batch, tokens], got {tuple(logprobs.shape)}")
    others = {"old_logprobs": old_logprobs, "mask": mask}
    if ref_logprobs is not None:
        others["ref_logprobs"] = ref_logprobs
    for name, tensor in others.items():
        if tensor.shape != logprobs.shape:
            raise ValueError(f"grpo_loss: {name} has shape {tuple(tensor.shape)}, logprobs {tuple(logprobs.shape)}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"grpo_loss: advantages must be [batch] = [{logprobs.shape[0]}], "
                         f"got {tuple(advantages.shape)}")
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if not 0 < clip_eps < 1 or clip_eps_high <= 0:
        raise ValueError(f"grpo_loss: need 0 < clip_eps < 1 and clip_eps_high > 0, got {clip_eps}, {clip_eps_high}")
    if kl_beta < 0:
        raise ValueError(f"grpo_loss: kl_beta must be >= 0, got {kl_beta}")
    if kl_beta > 0 and ref_logprobs is None:
        raise ValueError(f"grpo_loss: kl_beta={kl_beta} needs ref_logprobs (or set kl_beta=0)")
    if normalizer is not None and not normalizer > 0:
        raise ValueError(f"grpo_loss: normalizer must be > 0, got {normalizer}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"grpo_loss: aggregation {aggregation!r}: allowed {', '.join(AGGREGATIONS)}")

    mask = mask.bool()
    # Padding may hold -inf or garbage: zero it before exp so that neither the loss nor its gradient
    # (0 × inf through exp's backward) sees it.
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    logp = torch.where(mask, logprobs, zero)
    old = torch.where(mask, old_logprobs.detach(), zero)
    adv = advantages.detach().to(logprobs.dtype)[:, None]

    ratio = torch.exp(logp - old)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps_high) * adv
    objective = torch.minimum(unclipped, clipped)
    kl = None
    if ref_logprobs is not None:
        delta = torch.where(mask, ref_logprobs.detach(), zero) - logp
        kl = torch.exp(delta) - delta - 1
        if kl_beta > 0:
            objective = objective - kl_beta * kl
    per_token = torch.where(mask, -objective, zero)

    tokens_per_seq = mask.sum(dim=1)
    if aggregation == "token_mean":
        divisor = normalizer if normalizer is not None else tokens_per_seq.sum().clamp(min=1)
        loss = per_token.sum() / divisor
    else:
        seq_means = per_token.sum(dim=1) / tokens_per_seq.clamp(min=1)
        divisor = normalizer if normalizer is not None else (tokens_per_seq > 0).sum().clamp(min=1)
        loss = seq_means.sum() / divisor

    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        clip_active = (clipped < unclipped) & mask
        return GRPOOutput(
            loss=loss,
            clip_fraction=clip_active.sum() / n,
            kl=None if kl is None else torch.where(mask, kl, zero).sum() / n,
            ratio_mean=torch.where(mask, ratio, zero).sum() / n,
            advantage_mean=advantages.detach().float().mean(),
            advantage_std=advantages.detach().float().std(unbiased=False),
        )
