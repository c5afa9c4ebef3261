"""The recipe's `promotion` section: how a run's model is compared with the champion, and whether
a person approves the promotion first. Torch-free and airflow-free (see recipe.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from posttrain.config_base import Strict

# A day: a reviewer who never answers leaves the run unpromoted, not running for ever.
DEFAULT_APPROVAL_TIMEOUT_S = 24 * 3600


class PromotionConfig(Strict):
    metric: str | None = None  # default: the paradigm's first metric
    mode: Literal["min", "max"] | None = None  # default: min for losses, max otherwise
    min_improvement: float = Field(0.0, ge=0, description="Margin by which the challenger must beat the champion")
    decision: Literal["mean", "confidence"] = Field("confidence", description="confidence: the paired bootstrap "
                                                    "interval of challenger − champion must clear min_improvement; "
                                                    "mean: the two aggregates are compared")
    confidence_level: float = Field(0.95, ge=0.5, le=0.999, description="Two-sided level of that interval")
    bootstrap_resamples: int = Field(2000, ge=100, le=100_000, description="Bootstrap resamples of the interval")
    bootstrap_seed: int = Field(0, ge=0, description="Seed of the resampling: same results, same interval")
    approval: Literal["none", "required"] = Field(
        "none", description="required: a human-in-the-loop task between evaluate and promote shows the comparison "
        "and a person approves (promote runs) or rejects (not promoted, the reason in decision.json)")
    approval_timeout: int = Field(DEFAULT_APPROVAL_TIMEOUT_S, ge=1, le=30 * 24 * 3600,
                                  description="Seconds the approval task waits for an answer; then the model is "
                                  "not promoted")
