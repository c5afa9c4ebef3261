"""The reward role: one Ray actor that scores completions with the recipe's reward functions."""

from __future__ import annotations

from posttrain.rewards import RewardSpec, score


class RewardWorker:
    """Scores completions with the recipe's reward functions (user functions import here, once).
    `rewards`: the recipe's `grpo.rewards` entries as dicts (what crosses to the actor)."""

    def __init__(self, rewards: list[dict]):
        self.specs = [RewardSpec.model_validate(r) for r in rewards]

    def score(self, completions: list[str], prompts: list[list[dict]], answers: list[str | None]) -> dict:
        return score(self.specs, completions, prompts, answers)
