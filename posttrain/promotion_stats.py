"""The paired comparison behind promotion: challenger and champion scored on the same eval examples.

Evaluation writes `eval/per_example.parquet`: one row per eval example with a stable `example_id`
(see `example_id`) and, per metric, what that example contributes to the aggregate:
- a plain mean (exact_match, preference_accuracy, reward_mean, …): the column `<metric>`;
- a token-weighted mean (eval_loss, kl_to_teacher: per assistant token over the whole split): the
  columns `<metric>__sum` (the example's summed loss) and `<metric>__tokens` (its labelled tokens).

The paired difference of a metric is the difference of the two models' aggregates computed over
the examples both scored: Σ num_c / Σ w_c − Σ num_h / Σ w_h, with (num, w) = (value, 1) for a plain
mean and (sum, tokens) for a token-weighted one. For a token-weighted metric that is the difference
of the two eval_loss values the runs report (when every example pairs), not the mean of per-example
losses, which would weigh a 5-token reply like a 500-token one. Its confidence interval is a
percentile bootstrap over examples (resampling example ids, keeping each pair together), seeded so
the same tables give the same interval. Torch-free and airflow-free: the promote task runs it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import IO, Any

import numpy as np

ID = "example_id"
CHUNK_ELEMENTS = 4_000_000  # resampled indices drawn at once (32 MB): memory stays flat for any eval set


def example_id(line: int, row: Any) -> str:
    """`<line>-<hash of the row>`: stable across runs for the same eval file, and different when a
    row changes or moves, so only the same example on the same line pairs."""
    digest = hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return f"{line}-{digest[:16]}"


def read_table(source: IO[bytes] | str) -> tuple[dict[str, list], dict[str, Any]]:
    """Columns and posttrain metadata (eval set and tokenizer fingerprints) of a per-example file."""
    import pyarrow.parquet as pq

    table = pq.read_table(source)
    raw = (table.schema.metadata or {}).get(b"posttrain")
    return table.to_pydict(), json.loads(raw) if raw else {}


def contributions(columns: Mapping[str, list], metric: str, where: str = "per-example results"
                  ) -> dict[str, tuple[float, float]]:
    """example id → (numerator, weight) of `metric`; examples without a value are left out."""
    if ID not in columns:
        raise ValueError(f"{where}: no {ID!r} column")
    if f"{metric}__sum" in columns and f"{metric}__tokens" in columns:
        nums, weights = columns[f"{metric}__sum"], columns[f"{metric}__tokens"]
    elif metric in columns:
        nums, weights = columns[metric], [1.0] * len(columns[metric])
    else:
        raise ValueError(f"{where}: no per-example values of {metric!r} (columns {sorted(columns)})")
    return {i: (float(v), float(w)) for i, v, w in zip(columns[ID], nums, weights, strict=True)
            if v is not None and w is not None and w > 0}


@dataclass(frozen=True)
class Paired:
    metric: str
    n: int  # examples both models scored
    difference: float  # challenger − champion, over those examples
    low: float
    high: float
    confidence_level: float
    resamples: int
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_bootstrap(challenger: Mapping[str, tuple[float, float]], champion: Mapping[str, tuple[float, float]],
                     metric: str, confidence_level: float = 0.95, resamples: int = 2000, seed: int = 0
                     ) -> Paired | None:
    """The paired difference and its percentile bootstrap interval; None when no example pairs."""
    ids = sorted(challenger.keys() & champion.keys())  # sorted: the draw must not depend on dict order
    if not ids:
        return None
    c = np.array([challenger[i] for i in ids], dtype=np.float64)
    h = np.array([champion[i] for i in ids], dtype=np.float64)
    difference = c[:, 0].sum() / c[:, 1].sum() - h[:, 0].sum() / h[:, 1].sum()
    rng = np.random.default_rng(seed)
    n, stats = len(ids), []
    chunk = max(1, CHUNK_ELEMENTS // n)
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        stats.append(c[idx, 0].sum(1) / c[idx, 1].sum(1) - h[idx, 0].sum(1) / h[idx, 1].sum(1))
    alpha = 1.0 - confidence_level
    low, high = np.quantile(np.concatenate(stats), [alpha / 2, 1 - alpha / 2])
    return Paired(metric, n, float(difference), float(low), float(high), confidence_level, resamples, seed)


def fingerprint_mismatch(challenger: Mapping[str, Any], champion: Mapping[str, Any]) -> str | None:
    """Why the two evaluations are not of the same thing (eval set, tokenizer), or None. A
    fingerprint only one side recorded is not a mismatch; the example ids still have to pair."""
    for key, what in (("eval_fingerprint", "eval set"), ("tokenizer_fingerprint", "tokenizer")):
        a, b = challenger.get(key), champion.get(key)
        if a and b and a != b:
            return f"the champion was evaluated with a different {what} ({b[:12]} vs {a[:12]})"
    return None


def decide_by_interval(paired: Paired, mode: str, min_improvement: float, champion_version: str
                       ) -> tuple[bool, str]:
    """Promote only when the interval's bound on the losing side clears min_improvement: for a
    metric to minimize, its upper bound must lie below −min_improvement; to maximize, its lower
    bound above min_improvement."""
    pct = f"{paired.confidence_level:.0%}"
    numbers = (f"{paired.metric} challenger − champion {champion_version} = {paired.difference:+.6g} "
               f"({pct} interval {paired.low:+.6g} to {paired.high:+.6g}, n={paired.n})")
    margin = f"{min_improvement:g}"
    if mode == "min":
        below = f"-{margin}" if min_improvement else margin  # "-0" would read oddly in the sentence
        win, bound, side = paired.high < -min_improvement, paired.high, f"below {below}"
    else:
        win, bound, side = paired.low > min_improvement, paired.low, f"above {margin}"
    which = "upper" if mode == "min" else "lower"
    verdict = "promoted" if win else "not promoted"
    return win, f"{numbers}: the {which} bound {bound:+.6g} is{'' if win else ' not'} {side}, so {verdict}"


Table = tuple[Mapping[str, list], Mapping[str, Any]]  # columns, metadata (as read_table returns them)


def compare(challenger: Table, champion: Table, metric: str, confidence_level: float = 0.95,
            resamples: int = 2000, seed: int = 0) -> tuple[Paired | None, str | None]:
    """The paired comparison of two per-example tables, or None and why they cannot be paired."""
    mismatch = fingerprint_mismatch(challenger[1], champion[1])
    if mismatch:
        return None, mismatch
    try:
        mine = contributions(challenger[0], metric, "this run's per-example results")
        theirs = contributions(champion[0], metric, "the champion's per-example results")
    except ValueError as exc:
        return None, str(exc)
    paired = paired_bootstrap(mine, theirs, metric, confidence_level, resamples, seed)
    if paired is None:
        return None, "no eval example of this run is one the champion was scored on"
    return paired, None
