"""DPO / IPO losses equal the papers' formulas computed in float64, gradients included."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.training_lib.losses.preference import preference_loss


def reference(pc: list[float], pr: list[float], rc: list[float], rr: list[float], beta: float, kind: str) -> float:
    """The formula, one pair at a time, in Python floats (float64)."""
    total = 0.0
    for a, b, c, d in zip(pc, pr, rc, rr, strict=True):
        h = (a - c) - (b - d)
        total += math.log1p(math.exp(-beta * h)) if kind == "sigmoid" else (h - 1 / (2 * beta)) ** 2
    return total / len(pc)


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_and_gradient_match_the_formula(kind: str, beta: float) -> None:
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(64, generator=g, dtype=torch.float64) * 20 - 50 for _ in range(4))
    pc.requires_grad_(True)
    out = preference_loss(pc, pr, rc, rr, beta, kind)
    want = reference(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist(), beta, kind)
    assert float(out.loss.detach()) == pytest.approx(want, rel=1e-12, abs=1e-12)
    out.loss.backward()
    h = (pc - rc) - (pr - rr)
    grad = -beta * torch.sigmoid(-beta * h) if kind == "sigmoid" else 2 * (h - 1 / (2 * beta))
    torch.testing.assert_close(pc.grad, grad.detach() / 64, rtol=1e-12, atol=1e-12)


def test_metrics_are_the_implicit_rewards() -> None:
    pc, pr = torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0])
    rc, rr = torch.tensor([-11.0, -20.0]), torch.tensor([-11.0, -16.0])
    m = preference_loss(pc, pr, rc, rr, beta=0.5).metrics()
    assert m["rewards/chosen"] == pytest.approx((0.5 * 1 + 0.5 * 0) / 2)
    assert m["rewards/rejected"] == pytest.approx((0.5 * -1 + 0.5 * 1) / 2)
    assert m["rewards/margin"] == pytest.approx(m["rewards/chosen"] - m["rewards/rejected"])
    assert m["rewards/accuracy"] == 0.5  # pair 1 prefers chosen, pair 2 rejected


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="allowed sigmoid, ipo"):
        preference_loss(*torch.zeros(4, 1), beta=0.1, kind="hinge")
