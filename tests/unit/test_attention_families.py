"""Per-document attention on the families' attention variants: Gemma 3's sliding-window layers see at
most `sliding_window` keys inside each packed document, exactly as transformers' own attention does
on the document alone; soft-capped logits (Gemma 2), which neither the attention nor the chunked
loss implement, are refused rather than silently computed without the cap."""

from __future__ import annotations

import pytest
import torch


def _gemma3(attn: str, **overrides: object) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {"sliding_window": 8, **overrides}
    config = AutoConfig.for_model("gemma3_text", vocab_size=101, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                  query_pre_attn_scalar=32, layer_types=["sliding_attention", "full_attention"],
                                  **settings)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()


def test_sliding_window_layers_match_transformers_within_each_packed_document() -> None:
    from posttrain.training_lib.models.attention import register

    ours, theirs = _gemma3(register()), _gemma3("eager")
    lengths = [21, 27]  # both longer than the 8-token window
    ids = torch.randint(0, 101, (1, sum(lengths)), generator=torch.Generator().manual_seed(1))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = ours(input_ids=ids, position_ids=positions).logits
        start = 0
        for n in lengths:
            alone = theirs(input_ids=ids[:, start:start + n]).logits
            torch.testing.assert_close(packed[:, start:start + n], alone, rtol=1e-5, atol=1e-5)
            start += n
        # The window matters here: without it the first layer would see the whole document.
        wide = _gemma3(register(), sliding_window=64)
        assert not torch.allclose(wide(input_ids=ids, position_ids=positions).logits, packed, atol=1e-4)


def test_soft_capped_logits_are_refused() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from posttrain.training_lib.models.attention import DocumentMaskError, register
    from posttrain.training_lib.models.with_loss import CausalLMWithLoss

    config = AutoConfig.for_model("gemma2", vocab_size=101, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=32,
                                  final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=register())
    with pytest.raises(ValueError, match=r"'gemma2' caps its output logits \(final_logit_softcapping=30.0\)"):
        CausalLMWithLoss(model)
    with pytest.raises(DocumentMaskError, match=r"no attention-logit soft-capping \(softcap=50.0\)"):
        model(input_ids=torch.zeros(1, 4, dtype=torch.long), position_ids=torch.arange(4)[None])
