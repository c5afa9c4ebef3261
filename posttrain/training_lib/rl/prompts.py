"""Which prompts each GRPO step trains on."""

from __future__ import annotations

import random

from posttrain.training_lib.seeding import derive_seed


class PromptCursor:
    """The prompts of each step: a shuffled pass over the data per epoch (seeded), resumable by position."""

    def __init__(self, count: int, seed: int, position: int = 0):
        self.count, self.seed, self.position = count, seed, position

    def take(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            epoch, offset = divmod(self.position, self.count)
            order = list(range(self.count))
            random.Random(derive_seed(self.seed, epoch)).shuffle(order)
            out.append(order[offset])
            self.position += 1
        return out
