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


def test_model_with_chunked_loss_matches_logits_loss_and_gradients(tiny_model) -> None:
    from transformers import AutoModelForCausalLM

    from posttrain.prep.packing import pack
    from posttrain.training_lib.losses.cross_entropy import summed_cross_entropy
    from posttrain.training_lib.models.attention import packed_forward, register
    from posttrain.training_lib.models.with_loss import CausalLMWithLoss

    register()
    g = torch.Generator().manual_seed(1)
    docs = [(torch.randint(3, 400, (n,), generator=g).tolist(), [i % 2 == 0 for i in range(n)]) for n in (50, 90)]
    [block] = pack(docs, 160, pad_id=0)
    batch = {k: torch.tensor([getattr(block, k)]) for k in ("input_ids", "position_ids", "labels")}

    reference = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="posttrain_docs")
    ours = CausalLMWithLoss(AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="posttrain_docs"),
                            chunk_tokens=16)
    expected = summed_cross_entropy(packed_forward(reference, batch), batch["labels"])
    got = ours(**batch)
    expected.backward()
    got.backward()
    assert torch.allclose(got, expected, rtol=1e-6)
    for (name, p), q in zip(reference.named_parameters(), ours.lm.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name
    with torch.no_grad():
        assert torch.allclose(ours(**batch), expected, rtol=1e-6)  # the scoring path
