"""What the approval gate shows the reviewer: promote's own decision, its interval and the
generations side by side (posttrain/promotion_decision.py)."""

from __future__ import annotations

from posttrain.promotion_config import PromotionConfig
from posttrain.promotion_decision import decide_against, review_markdown, side_by_side


def _table(losses: list[float], texts: list[str | None]) -> tuple[dict[str, list], dict]:
    ids = [f"{i}-x" for i in range(len(losses))]
    return {"example_id": ids, "eval_loss__sum": losses, "eval_loss__tokens": [1.0] * len(losses),
            "generated": texts}, {}


def test_the_review_shows_the_decision_promote_would_make() -> None:
    p = PromotionConfig(metric="eval_loss", mode="min", bootstrap_resamples=200)
    mine = _table([1.0, 1.1, 0.9, 1.0], ["a | b", None, "c", "d"])
    theirs = _table([2.0, 2.1, 1.9, 2.0], ["old a", "old b", "old c", "old d"])
    champion = {"version": "v1", "value": 2.0, "per_example_uri": "mem://champion"}
    decision = decide_against(p, "file:///c.json", 1.0, mine, champion, {"mem://champion": theirs}.get)
    assert decision["promoted"] and decision["comparison"]["n"] == 4
    samples = side_by_side(mine, theirs, limit=2)
    # The example without a generation is left out; each row pairs the same example.
    assert samples == [{"example_id": "0-x", "challenger": "a | b", "champion": "old a"},
                       {"example_id": "2-x", "challenger": "c", "champion": "old c"}]
    body = review_markdown(decision, samples, timeout_s=30)
    assert "**champion**: v1 (eval_loss 2)" in body and "95% interval [" in body
    assert "**the rule says**: promote" in body and "No answer within 30 s: not promoted." in body
    assert "| 0-x | a \\| b | old a |" in body  # a pipe in a generation doesn't break the table


def test_without_a_champion_the_review_says_so() -> None:
    p = PromotionConfig(metric="eval_loss", mode="min")
    mine = _table([1.0], ["a"])
    decision = decide_against(p, "file:///c.json", 1.0, mine, None, lambda uri: None)
    body = review_markdown(decision, side_by_side(mine, None), timeout_s=5)
    assert "none yet" in body and "| 0-x | a | — |" in body and decision["comparison"] is None
