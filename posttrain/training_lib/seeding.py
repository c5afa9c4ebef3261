"""Seeds derived from the recipe's one seed, by a single formula, so that every shuffle, sampling
call and initialisation of a run is reproducible and no two of them share a stream."""

from __future__ import annotations


def derive_seed(seed: int, offset: int) -> int:
    """The seed of stream `offset` (an epoch, a step, a hashed parameter name) of the run seeded `seed`."""
    return seed * 1_000_003 + offset
