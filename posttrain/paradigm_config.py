"""The recipe sections of the paradigms beyond SFT (`dpo`, `kd`, `grpo`) and what each paradigm
trains on. Part of the recipe schema (posttrain/recipe.py); imports no torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from posttrain.config_base import NonBlank
from posttrain.config_base import Strict as _Strict
from posttrain.rewards import RewardSpec
from posttrain.uris import check_model_uri

Paradigm = Literal["sft", "dpo", "kd", "grpo"]
# The data format each paradigm trains on (the metrics each is evaluated by: posttrain/eval_metrics.py).
PARADIGM_DATA: dict[str, str] = {"sft": "chat", "dpo": "preference", "kd": "chat", "grpo": "prompt"}


class DpoConfig(_Strict):
    """Direct preference optimization (paradigm dpo, data.format preference)."""
    beta: float = Field(0.1, gt=0)
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    # precomputed: the reference log-probs of every train pair are computed once, before the first
    # update (the policy then is the reference), and kept in the workspace; on_the_fly (LoRA only):
    # the base model with the adapters disabled scores each batch (no second copy of the weights).
    reference: Literal["precomputed", "on_the_fly"] = "precomputed"


class KdConfig(_Strict):
    """Knowledge distillation (paradigm kd, chat data): a frozen teacher of the same tokenizer."""
    teacher: NonBlank  # a local folder (relative to the recipe), s3://bucket/prefix or hf://org/name
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    temperature: float = Field(1.0, gt=0)
    # loss = weight · divergence + (1 − weight) · cross-entropy on the data, per assistant token
    weight: float = Field(0.5, ge=0, le=1)

    @field_validator("teacher")
    @classmethod
    def _teacher_uri(cls, value: str) -> str:
        return check_model_uri(value)  # s3:// through each node's model cache, as model.base


class GrpoConfig(_Strict):
    """On-policy RL with group-relative advantages (paradigm grpo, prompt data)."""
    group_size: int = Field(4, ge=2, le=256)  # completions sampled per prompt (G)
    prompts_per_step: int = Field(4, ge=1)
    max_new_tokens: int = Field(32, ge=1, le=32768)
    temperature: float = Field(1.0, gt=0)
    clip_eps: float = Field(0.2, gt=0, lt=1)
    clip_eps_high: float | None = Field(None, gt=0)  # DAPO's decoupled upper clip (default: clip_eps)
    kl_beta: float = Field(0.04, ge=0)  # weight of the KL to the reference; 0: no reference model
    aggregation: Literal["token_mean", "sequence_mean"] = "token_mean"
    normalize_advantages: bool = True  # divide by the group's reward std (GRPO); false: mean-centred only
    # 1: the next batch is generated while the policy updates on this one (one step stale, the
    # clipped ratio corrects for it); 0: strictly on-policy.
    staleness: Literal[0, 1] = 0
    rollout_workers: int = Field(1, ge=1, le=64)
    sync_bucket_mb: int = Field(256, ge=1)  # full-weight sync to the rollout engines, in buckets of this size
    rewards: list[RewardSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_keys(self) -> GrpoConfig:
        keys = [r.key for r in self.rewards]
        if len(set(keys)) != len(keys) or "total" in keys:
            raise ValueError(f"reward keys must be unique and not 'total' (set label): {keys}")
        return self
