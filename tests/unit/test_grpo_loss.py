"""GRPO loss and advantages equal the formulas (DeepSeekMath GRPO, DAPO token mean, Schulman's k3)
computed one token at a time in Python floats (float64), gradients included."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.training_lib.losses.grpo import group_advantages, grpo_loss

B, T = 6, 9


def reference(logp: list[list[float]], old: list[list[float]], ref: list[list[float]], adv: list[float],
              mask: list[list[bool]], eps: float, eps_high: float, beta: float, aggregation: str
              ) -> tuple[float, list[list[float]], int]:
    """(loss, d loss / d logp, number of clipped tokens), one token at a time."""
    per_seq: list[list[tuple[float, float]]] = []  # (−objective, −d objective / d logp) per masked token
    clipped_tokens = 0
    for i in range(len(logp)):
        tokens = []
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logp[i][t] - old[i][t])
            unclipped = ratio * adv[i]
            clipped = min(max(ratio, 1 - eps), 1 + eps_high) * adv[i]
            if clipped < unclipped:  # the clipped branch: constant in logp
                objective, grad = clipped, 0.0
                clipped_tokens += 1
            else:
                objective, grad = unclipped, ratio * adv[i]
            d = ref[i][t] - logp[i][t]
            objective -= beta * (math.exp(d) - d - 1)
            grad -= beta * (1 - math.exp(d))  # d/dlogp of k3 = 1 − exp(ref − logp)
            tokens.append((-objective, -grad))
        per_seq.append(tokens)
    grads = [[0.0] * len(row) for row in logp]
    if aggregation == "token_mean":
        n = sum(len(tokens) for tokens in per_seq)
        loss = sum(value for tokens in per_seq for value, _ in tokens) / n
        weights = [1 / n] * len(per_seq)
    else:
        n = sum(1 for tokens in per_seq if tokens)
        loss = sum(sum(v for v, _ in tokens) / len(tokens) for tokens in per_seq if tokens) / n
        weights = [1 / (n * len(tokens)) if tokens else 0.0 for tokens in per_seq]
    for i, tokens in enumerate(per_seq):
        positions = [t for t in range(len(mask[i])) if mask[i][t]]
        for t, (_, g) in zip(positions, tokens, strict=True):
            grads[i][t] = g * weights[i]
    return loss, grads, clipped_tokens


def random_batch(seed: int, spread: float) -> dict[str, torch.Tensor]:
    """Prompt tokens, then a completion of random length, then padding (−inf log-probs, which the loss
    must ignore); row 0 has no completion token at all."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * spread
    ref = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    start = torch.randint(0, 3, (B, 1), generator=g)
    end = start + torch.randint(1, T - 2, (B, 1), generator=g)
    positions = torch.arange(T)[None, :]
    mask = (positions >= start) & (positions < end)
    mask[0] = False
    logp = logp.masked_fill(positions >= end, -math.inf)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return {"logprobs": logp.requires_grad_(True), "old_logprobs": old, "ref_logprobs": ref, "advantages": adv,
            "mask": mask}


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
@pytest.mark.parametrize("spread", [0.005, 0.5], ids=["no-clip", "clip"])
@pytest.mark.parametrize("kl_beta", [0.0, 0.04])
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_loss_and_gradient_match_the_formula(aggregation: str, spread: float, kl_beta: float,
                                             eps_high: float | None) -> None:
    batch = random_batch(seed=int(spread * 1000) + len(aggregation), spread=spread)
    out = grpo_loss(**batch, clip_eps=0.2, kl_beta=kl_beta, aggregation=aggregation, clip_eps_high=eps_high)
    want, want_grad, clipped = reference(
        batch["logprobs"].tolist(), batch["old_logprobs"].tolist(), batch["ref_logprobs"].tolist(),
        batch["advantages"].tolist(), batch["mask"].tolist(), 0.2, eps_high or 0.2, kl_beta, aggregation)
    assert float(out.loss.detach()) == pytest.approx(want, rel=1e-12, abs=1e-12)
    out.loss.backward()
    torch.testing.assert_close(batch["logprobs"].grad, torch.tensor(want_grad, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    tokens = int(batch["mask"].sum())
    assert float(out.clip_fraction) == pytest.approx(clipped / tokens)
    assert (clipped == 0) if spread < 0.01 else (0 < clipped < tokens)
    masked = batch["mask"]
    d = (batch["ref_logprobs"] - batch["logprobs"].detach())[masked]
    assert float(out.kl) == pytest.approx(float((d.exp() - d - 1).mean()), rel=1e-12)
    ratio = (batch["logprobs"].detach() - batch["old_logprobs"])[masked].exp()
    assert float(out.ratio_mean) == pytest.approx(float(ratio.mean()), rel=1e-12)
    assert all(math.isfinite(v) for v in out.metrics().values())


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
@pytest.mark.parametrize("kl_beta", [0.0, 0.1])
def test_on_policy_step_is_the_advantage_weighted_policy_gradient(aggregation: str, kl_beta: float) -> None:
    batch = random_batch(seed=3, spread=0.0)
    batch["old_logprobs"] = batch["logprobs"].detach().clone()
    batch["ref_logprobs"] = batch["logprobs"].detach().clone()  # k3 and its gradient are 0 at π = π_ref
    out = grpo_loss(**batch, kl_beta=kl_beta, aggregation=aggregation)
    out.loss.backward()
    assert float(out.ratio_mean) == 1.0
    assert float(out.clip_fraction) == 0.0
    assert float(out.kl) == 0.0
    mask = batch["mask"].double()
    lengths = mask.sum(dim=1, keepdim=True)
    if aggregation == "token_mean":
        normaliser = mask.sum()
    else:
        normaliser = lengths.clamp(min=1) * (lengths > 0).sum()
    want = -batch["advantages"][:, None] * mask / normaliser
    torch.testing.assert_close(batch["logprobs"].grad, want, rtol=1e-12, atol=1e-15)
    # on-policy, the loss is −(mean advantage over tokens or sequences): the k3 term is 0
    assert float(out.loss.detach()) == pytest.approx(float((-(batch["advantages"][:, None] * mask) / normaliser).sum()))


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_micro_batches_with_a_normalizer_add_up_to_the_whole_batch(aggregation: str) -> None:
    batch = random_batch(seed=5, spread=0.3)
    whole = grpo_loss(**batch, aggregation=aggregation)
    whole.loss.backward()
    want_grad = batch["logprobs"].grad.clone()
    batch["logprobs"].grad = None
    mask = batch["mask"]
    total = float(mask.sum()) if aggregation == "token_mean" else float((mask.sum(dim=1) > 0).sum())
    summed = sum(grpo_loss(**{k: v[part] for k, v in batch.items()}, aggregation=aggregation,
                           normalizer=total).loss for part in (slice(0, 2), slice(2, B)))
    summed.backward()
    assert float(summed.detach()) == pytest.approx(float(whole.loss.detach()), rel=1e-12)
    torch.testing.assert_close(batch["logprobs"].grad, want_grad, rtol=1e-12, atol=1e-15)


def test_float32_and_no_reference() -> None:
    batch = {k: (v.float() if v.is_floating_point() else v) for k, v in random_batch(seed=7, spread=0.3).items()}
    batch["logprobs"] = batch["logprobs"].detach().requires_grad_(True)
    out = grpo_loss(**{**batch, "ref_logprobs": None}, kl_beta=0.0)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and out.kl is None and "kl" not in out.metrics()
    assert torch.isfinite(batch["logprobs"].grad).all()
    assert (batch["logprobs"].grad[~batch["mask"]] == 0).all()
    assert out.loss.shape == () and out.clip_fraction.requires_grad is False


def test_shape_and_argument_errors_are_clear() -> None:
    batch = random_batch(seed=9, spread=0.1)
    with pytest.raises(ValueError, match=r"old_logprobs has shape \(6, 8\), logprobs \(6, 9\)"):
        grpo_loss(**{**batch, "old_logprobs": batch["old_logprobs"][:, :8]})
    with pytest.raises(ValueError, match=r"advantages must be \[batch\] = \[6\], got \(6, 1\)"):
        grpo_loss(**{**batch, "advantages": batch["advantages"][:, None]})
    with pytest.raises(ValueError, match="kl_beta=0.04 needs ref_logprobs"):
        grpo_loss(**{**batch, "ref_logprobs": None})
    with pytest.raises(ValueError, match="aggregation 'seq_mean': allowed token_mean, sequence_mean"):
        grpo_loss(**batch, aggregation="seq_mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="0 < clip_eps < 1"):
        grpo_loss(**batch, clip_eps=1.5)


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0,   2.0, 2.0, 2.0, 2.0,   0.0, 0.0, 0.0, 3.0,   0.1, 0.1, 0.1, 0.1],
                           dtype=torch.float64)
    s3 = math.sqrt(3)
    want = [1, -1, -1, 1,   0, 0, 0, 0,   -1 / s3, -1 / s3, -1 / s3, s3,   0, 0, 0, 0]
    torch.testing.assert_close(group_advantages(rewards, 4, eps=0.0), torch.tensor(want, dtype=torch.float64))
    approx = group_advantages(rewards, 4)  # eps=1e-6 shrinks a little; all-equal groups stay exactly 0
    torch.testing.assert_close(approx, torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=0)
    assert (approx[4:8] == 0).all() and (approx[12:] == 0).all()
    centred = [0.5, -0.5, -0.5, 0.5,   0, 0, 0, 0,   -0.75, -0.75, -0.75, 2.25,   0, 0, 0, 0]
    torch.testing.assert_close(group_advantages(rewards, 4, normalize_std=False),
                               torch.tensor(centred, dtype=torch.float64))
    assert (group_advantages(rewards, 1) == 0).all()
    assert group_advantages(torch.tensor([1, 0]), 2).tolist() == pytest.approx([1.0, -1.0], rel=1e-5)


def test_group_advantages_errors() -> None:
    with pytest.raises(ValueError, match="10 rewards is not a multiple of group_size 4"):
        group_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError, match=r"rewards must be 1-D .* got \(2, 4\)"):
        group_advantages(torch.zeros(2, 4), 4)
    with pytest.raises(ValueError, match="group_size must be >= 1, got 0"):
        group_advantages(torch.zeros(4), 0)
