"""A vocabulary padded at load (437 → 448 rows on the tiny Qwen3, whose checkpoint is unpadded)
changes nothing a loss sees: the SFT loss, the per-token log-probs (DPO, its reference, GRPO) and the
distillation pair (KD) equal the unpadded model's, because the padding rows never enter a softmax."""

from __future__ import annotations

import pytest
import torch

from posttrain.recipe import load_recipe
from tests.conftest import tiny_family, write_recipe


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    from posttrain.training_lib.models.attention import register
    from posttrain.training_lib.models.loading import load_for_training
    from posttrain.training_lib.models.with_loss import CausalLMWithLoss

    folder = tiny_family("qwen3")
    plain = CausalLMWithLoss(AutoModelForCausalLM.from_pretrained(folder, attn_implementation=register()))
    recipe = load_recipe(write_recipe(tmp_path_factory.mktemp("pad"), model={"base": str(folder),
                                                                             "pad_vocab_to_multiple_of": 64}))
    return plain, CausalLMWithLoss(load_for_training(recipe))


def test_the_padded_model_has_zero_padding_rows_and_knows_its_real_vocabulary(models: tuple) -> None:
    plain, padded = models
    assert plain.lm.config.vocab_size == 437 and padded.lm.config.vocab_size == 448
    assert padded.lm.config.unpadded_vocab_size == 437
    assert torch.equal(padded.lm.lm_head.weight[437:], torch.zeros(11, 64))


def test_losses_and_logprobs_equal_the_unpadded_model(models: tuple) -> None:
    from posttrain.training_lib.losses.chunked import chunked_cross_entropy
    from posttrain.training_lib.models.verify import random_batch

    plain, padded = models
    batch = random_batch(437, seq_len=48)
    with torch.no_grad():
        for model in (plain, padded):
            model.eval()
        torch.testing.assert_close(padded(**batch), plain(**batch), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(padded(**batch, output="token_logprobs"), plain(**batch, output="token_logprobs"),
                                   rtol=1e-6, atol=1e-6)
        teacher = (plain(**batch, output="hidden"), plain.lm.lm_head.weight)
        padded_teacher = (teacher[0], padded.lm.lm_head.weight)  # a padded teacher: its rows cut to the student's
        torch.testing.assert_close(padded(**batch, output="distill", teacher=padded_teacher),
                                   plain(**batch, output="distill", teacher=teacher), rtol=1e-6, atol=1e-5)
        # The 11 zero rows would otherwise each add exp(0) to every softmax: a different loss.
        hidden = padded(**batch, output="hidden")
        with_padding = chunked_cross_entropy(hidden, padded.lm.lm_head.weight, batch["labels"])
        assert not torch.allclose(with_padding, plain(**batch), rtol=1e-4)


def test_unpadding_restores_the_checkpoint(models: tuple) -> None:
    """What the export does before saving: the checkpoint's own shapes and weights, no padding row."""
    import copy

    from posttrain.training_lib.models.loading import unpad_vocab

    plain, padded = models
    lm = copy.deepcopy(padded.lm)
    unpad_vocab(lm)
    assert lm.config.vocab_size == 437 and not hasattr(lm.config, "unpadded_vocab_size")
    assert "unpadded_vocab_size" not in lm.config.to_dict()
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # still tied
    torch.testing.assert_close(lm.lm_head.weight, plain.lm.lm_head.weight, rtol=0, atol=0)
