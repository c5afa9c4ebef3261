"""The paired comparison behind promotion, on cases computable by hand."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posttrain.promotion_stats import (
    compare,
    contributions,
    decide_by_interval,
    example_id,
    paired_bootstrap,
    read_table,
)
from posttrain.recipe import load_recipe


def plain(values: list[float]) -> dict[str, tuple[float, float]]:
    return {f"e{i}": (v, 1.0) for i, v in enumerate(values)}


def test_identical_models_give_an_interval_of_zero_and_no_promotion() -> None:
    scores = plain([0.3, 1.2, 2.5, 0.7])
    paired = paired_bootstrap(scores, scores, "eval_loss", resamples=500)
    assert paired is not None and (paired.difference, paired.low, paired.high, paired.n) == (0.0, 0.0, 0.0, 4)
    assert decide_by_interval(paired, "min", 0.0, "v1")[0] is False
    assert decide_by_interval(paired, "max", 0.0, "v1")[0] is False


@pytest.mark.parametrize(("mode", "shift", "promote"), [("min", -1.0, True), ("min", 1.0, False),
                                                        ("max", 1.0, True), ("max", -1.0, False)])
def test_a_constant_shift_is_its_own_interval(mode: str, shift: float, promote: bool) -> None:
    champion = plain([0.5, 1.0, 3.0])
    challenger = {k: (v + shift, w) for k, (v, w) in champion.items()}
    paired = paired_bootstrap(challenger, champion, "m", resamples=300)
    assert paired is not None
    assert paired.difference == pytest.approx(shift) and (paired.low, paired.high) == pytest.approx((shift, shift))
    won, reason = decide_by_interval(paired, mode, 0.0, "v1")
    assert won is promote
    assert "n=3" in reason and ("so promoted" if promote else "so not promoted") in reason


def test_min_improvement_must_be_cleared_by_the_bound() -> None:
    champion = plain([1.0, 2.0])
    paired = paired_bootstrap({k: (v - 0.1, w) for k, (v, w) in champion.items()}, champion, "m", resamples=200)
    assert paired is not None
    assert decide_by_interval(paired, "min", 0.05, "v1")[0] is True
    assert decide_by_interval(paired, "min", 0.2, "v1")[0] is False


def test_percentile_interval_of_two_examples() -> None:
    # Differences 0 and 1: a resample's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the
    # 95% interval is [0, 1] and the 30% one [0.5, 0.5] (its 35th and 65th percentiles fall in the
    # middle half).
    challenger, champion = plain([1.0, 2.0]), plain([1.0, 1.0])
    wide = paired_bootstrap(challenger, champion, "m", 0.95, 4000, seed=3)
    narrow = paired_bootstrap(challenger, champion, "m", 0.3, 4000, seed=3)
    assert wide is not None and narrow is not None
    assert (wide.difference, wide.low, wide.high) == (0.5, 0.0, 1.0)
    assert (narrow.low, narrow.high) == (0.5, 0.5)


def test_seeded_resampling_is_reproducible() -> None:
    challenger, champion = plain([0.1, 0.9, 0.4, 0.8, 0.3]), plain([0.2, 0.5, 0.6, 0.1, 0.3])
    a = paired_bootstrap(challenger, champion, "m", resamples=1000, seed=7)
    b = paired_bootstrap(dict(reversed(challenger.items())), champion, "m", resamples=1000, seed=7)
    c = paired_bootstrap(challenger, champion, "m", resamples=1000, seed=8)
    assert a == b  # the order examples arrive in does not matter
    assert a is not None and c is not None and (a.low, a.high) != (c.low, c.high)


def test_token_weighted_difference_equals_the_difference_of_aggregates() -> None:
    # eval_loss is loss per token over the split: 10 tokens at 2.0 and 2 tokens at 8.0 average 3.0
    # (not the mean of per-example losses, 5.0).
    champion = {"a": (20.0, 10.0), "b": (16.0, 2.0)}
    challenger = {"a": (10.0, 10.0), "b": (16.0, 2.0)}
    paired = paired_bootstrap(challenger, champion, "eval_loss", resamples=200)
    assert paired is not None and paired.difference == pytest.approx(26 / 12 - 36 / 12)
    columns = {"example_id": ["a", "b"], "eval_loss__sum": [20.0, 16.0], "eval_loss__tokens": [10, 2],
               "exact_match": [1.0, None]}
    assert contributions(columns, "eval_loss") == champion
    assert contributions(columns, "exact_match") == {"a": (1.0, 1.0)}


def test_tables_that_cannot_be_paired_say_why(tmp_path: Path) -> None:
    cols = {"example_id": ["1-aa", "2-bb"], "exact_match": [1.0, 0.0]}
    other = {"example_id": ["3-cc"], "exact_match": [1.0]}
    assert compare((cols, {}), (other, {}), "exact_match") == (
        None, "no eval example of this run is one the champion was scored on")
    paired, why = compare((cols, {"tokenizer_fingerprint": "aaaa"}), (cols, {"tokenizer_fingerprint": "bbbb"}),
                          "exact_match")
    assert paired is None and why is not None and "different tokenizer" in why
    paired, why = compare((cols, {}), (cols, {}), "eval_loss")
    assert paired is None and why is not None and "no per-example values of 'eval_loss'" in why
    # What evaluation writes reads back, metadata included.
    table = pa.table(cols).replace_schema_metadata({"posttrain": '{"eval_fingerprint": "f"}'})
    pq.write_table(table, tmp_path / "p.parquet")
    assert read_table(str(tmp_path / "p.parquet")) == (cols, {"eval_fingerprint": "f"})


def test_example_ids_are_stable_and_change_with_the_row() -> None:
    row = {"messages": [{"role": "user", "content": "hi"}]}
    assert example_id(3, row) == example_id(3, {"messages": [{"content": "hi", "role": "user"}]})
    assert example_id(3, row) != example_id(4, row)
    assert example_id(3, row) != example_id(3, {"messages": [{"role": "user", "content": "hello"}]})


def test_recipe_promotion_fields_default_to_confidence_and_are_bounded(tmp_path: Path) -> None:
    from tests.conftest import write_recipe
    from tests.unit.test_recipe import errors_of

    p = load_recipe(write_recipe(tmp_path / "ok")).promotion
    assert (p.decision, p.confidence_level, p.bootstrap_resamples, p.bootstrap_seed) == ("confidence", 0.95, 2000, 0)
    for sections, field in (({"decision": "median"}, "promotion.decision"),
                            ({"bootstrap_resamples": 10}, "promotion.bootstrap_resamples"),
                            ({"confidence_level": 1.0}, "promotion.confidence_level"),
                            ({"confidence": 0.9}, "promotion.confidence")):
        errors = errors_of(write_recipe(tmp_path / field, promotion=sections))
        assert any(loc == field for loc, _ in errors), errors
