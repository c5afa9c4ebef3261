"""Chunked cross-entropy gives the naive loss and gradients without the full logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from posttrain.training_lib.losses.chunked import chunked_cross_entropy


@pytest.mark.parametrize(("chunk", "weight_grad"), [(7, True), (64, True), (1000, True), (16, False)])
def test_same_loss_and_gradients_as_the_naive_path(chunk: int, weight_grad: bool) -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 50, 32, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(300, 32, generator=g, dtype=torch.float64, requires_grad=weight_grad)
    labels = torch.randint(0, 300, (2, 50), generator=g)
    labels[0, :10] = -100  # positions that don't train
    labels[1, 45:] = -100

    naive = F.cross_entropy((hidden @ weight.t()).view(-1, 300), labels.view(-1), ignore_index=-100, reduction="sum")
    naive_grads = torch.autograd.grad(naive * 0.5, [hidden, weight] if weight_grad else [hidden])
    chunked = chunked_cross_entropy(hidden, weight, labels, chunk_size=chunk)
    chunked_grads = torch.autograd.grad(chunked * 0.5, [hidden, weight] if weight_grad else [hidden])

    assert torch.allclose(chunked.double(), naive, atol=1e-9)
    for a, b in zip(chunked_grads, naive_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-9)
    assert chunked_grads[0][0, :10].abs().sum() == 0  # ignored positions get no gradient
