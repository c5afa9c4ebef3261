"""Direct preference optimization losses over sequence log-probabilities (Rafailov et al. 2023;
IPO: Azar et al. 2023).

Inputs are, per pair, the summed log-probabilities of the chosen and rejected responses under the
policy and under the frozen reference (with LoRA: the base model with the adapters disabled). The
implicit reward of a response is beta × (policy − reference) log-probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PreferenceOutput:
    loss: torch.Tensor  # mean over pairs (differentiable)
    rewards_chosen: torch.Tensor  # [pairs], detached
    rewards_rejected: torch.Tensor

    def metrics(self) -> dict[str, float]:
        margin = self.rewards_chosen - self.rewards_rejected
        return {"loss": float(self.loss.detach()), "rewards/chosen": float(self.rewards_chosen.mean()),
                "rewards/rejected": float(self.rewards_rejected.mean()), "rewards/margin": float(margin.mean()),
                "rewards/accuracy": float((margin > 0).float().mean())}


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, beta: float, kind: str = "sigmoid") -> PreferenceOutput:
    """`sigmoid` (DPO): −log σ(β·h); `ipo`: (h − 1/(2β))², with h the difference of the chosen and
    rejected log-ratios. IPO is meant for length-normalized (mean per token) log-probabilities:
    pass those for `ipo`."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif kind == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"preference loss {kind!r}: allowed sigmoid, ipo")
    return PreferenceOutput(loss=losses.mean(), rewards_chosen=(beta * chosen_ratio).detach(),
                            rewards_rejected=(beta * rejected_ratio).detach())
