"""Distillation divergences equal a float64 reference on full logits (loss and gradients), count
only labelled positions, and refuse a teacher with another vocabulary."""

from __future__ import annotations

import pytest
import torch

from posttrain.training_lib.losses.distill import distill_loss


def reference(hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor, labels: torch.Tensor,
              kind: str, temperature: float) -> torch.Tensor:
    keep = labels.reshape(-1) != -100
    p_s = torch.softmax((hs.reshape(-1, hs.shape[-1])[keep] @ ws.t()) / temperature, dim=-1)
    p_t = torch.softmax((ht.reshape(-1, ht.shape[-1])[keep] @ wt.t()) / temperature, dim=-1)

    def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return (p * (p.log() - q.log())).sum()

    m = (p_s + p_t) / 2
    value = {"forward_kl": kl(p_t, p_s), "reverse_kl": kl(p_s, p_t), "jsd": (kl(p_s, m) + kl(p_t, m)) / 2}[kind]
    return value * temperature ** 2


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_loss_and_gradients_match_the_float64_reference(kind: str, temperature: float) -> None:
    g = torch.Generator().manual_seed(1)
    vocab, hidden, teacher_hidden = 300, 16, 24
    hs = torch.randn(2, 40, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    ws = (torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    ht = torch.randn(2, 40, teacher_hidden, generator=g, dtype=torch.float64)
    wt = torch.randn(vocab, teacher_hidden, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, vocab, (2, 40), generator=g)
    labels[:, :7] = -100  # prompt positions don't count

    got = distill_loss(hs, ws, ht, wt, labels, kind, temperature, chunk_size=13)
    gh, gw = torch.autograd.grad(got, (hs, ws))
    want = reference(hs, ws, ht, wt, labels, kind, temperature)
    wh, ww = torch.autograd.grad(want, (hs, ws))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gh, wh, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gw, ww, rtol=1e-9, atol=1e-10)
    assert float(gh[:, :7].abs().max()) == 0.0  # masked positions get no gradient


def test_identical_models_have_zero_divergence() -> None:
    h, w = torch.randn(1, 10, 8), torch.randn(50, 8)
    labels = torch.zeros(1, 10, dtype=torch.long)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert float(distill_loss(h, w, h, w, labels, kind).detach()) == pytest.approx(0.0, abs=1e-5)


def test_a_teacher_with_another_vocabulary_is_refused() -> None:
    with pytest.raises(ValueError, match="needs the same tokenizer"):
        distill_loss(torch.randn(1, 4, 8), torch.randn(50, 8), torch.randn(1, 4, 8), torch.randn(64, 8),
                     torch.zeros(1, 4, dtype=torch.long))
