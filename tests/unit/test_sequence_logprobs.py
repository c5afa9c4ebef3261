"""Chunked label log-probabilities and their per-sequence sums (what DPO compares) equal the plain
log-softmax computation, values and gradients; packed preference pairs keep each side apart."""

from __future__ import annotations

import torch

from posttrain.prep.packing import IGNORE
from posttrain.training_lib.data.pairs import collate_pairs
from posttrain.training_lib.losses.logprobs import sequence_ids, sequence_logprobs, token_logprobs


def test_token_logprobs_equal_log_softmax_values_and_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 37), generator=g)
    labels[0, :5] = IGNORE
    labels[1, -3:] = IGNORE
    got = token_logprobs(hidden, weight, labels, chunk_size=7)
    logp = torch.log_softmax(hidden @ weight.t(), dim=-1)
    want = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != IGNORE)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    coef = torch.randn(2, 37, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((got * coef).sum(), (hidden, weight))
    want_grads = torch.autograd.grad((want * coef).sum(), (hidden, weight))
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_pairs_pack_into_one_row_and_sum_per_side() -> None:
    pairs = [([5, 6, 7], [False, True, True], [5, 6, 8, 9], [False, True, True, True]),
             ([5, 7], [False, True], [5, 9, 9], [False, True, True])]
    batch = collate_pairs(pairs, pad_id=0, pad_to=16)
    assert batch["input_ids"].shape == (1, 16) and int(batch["num_sequences"]) == 5  # 4 sides + the padding tail
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 1, 2, 0, 1, 2, 3]
    assert sequence_ids(batch["position_ids"])[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 4]
    # Labels never cross into the next sequence: each side's last position predicts nothing.
    assert batch["labels"][0].tolist()[:7] == [6, 7, IGNORE, 6, 8, 9, IGNORE]
    token_logps = torch.arange(16, dtype=torch.float64)[None] * (batch["labels"] != IGNORE)
    sums = sequence_logprobs(token_logps, batch["position_ids"], 5)
    assert sums.tolist() == [0 + 1, 3 + 4 + 5, 7, 9 + 10, 0]
