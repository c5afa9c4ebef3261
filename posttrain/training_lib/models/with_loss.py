"""The causal LM and its loss as one plain module: forward(batch) → summed token loss.

The loss is computed from the final hidden states with the chunked cross-entropy, so the full
logits never exist. It is one module so that FSDP2's root unit gathers the output projection for
the loss exactly as it gathers the embedding for the input (reaching for `lm_head.weight` outside
a forward would find it sharded).
"""

from __future__ import annotations

import torch

from posttrain.training_lib.losses.chunked import chunked_cross_entropy
from posttrain.training_lib.losses.distill import distill_loss
from posttrain.training_lib.losses.logprobs import token_logprobs
from posttrain.training_lib.models.attention import check_isolates_documents


def base_model(lm: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside a PEFT wrapper (or the model itself)."""
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


def output_weight(base: torch.nn.Module) -> torch.Tensor:
    """The output layer's rows of real tokens: the rows added by vocabulary padding (loading.pad_vocab)
    are left out, so losses and log-probs are those of the unpadded model."""
    weight = base.lm_head.weight
    real = getattr(base.config, "unpadded_vocab_size", None)
    return weight[:real] if real is not None and real < weight.shape[0] else weight


class CausalLMWithLoss(torch.nn.Module):
    PREFIX = "lm."  # state-dict keys of the wrapped model start with this

    def __init__(self, lm: torch.nn.Module, chunk_tokens: int = 1024, head: torch.nn.Module | None = None):
        super().__init__()
        softcap = getattr(base_model(lm).config, "final_logit_softcapping", None)
        if softcap is not None:  # Gemma 2: the loss from the hidden states would skip the cap
            raise ValueError(f"model_type {base_model(lm).config.model_type!r} caps its output logits "
                             f"(final_logit_softcapping={softcap}); the chunked loss does not support that yet")
        self.lm = lm
        self.chunk_tokens = chunk_tokens
        # A recipe's custom head (model.components.head): a submodule of this one, outside the PEFT
        # wrapper (so it trains under LoRA too) and inside FSDP2's root unit (gathered with the rest).
        # State-dict keys `head.*`; the export writes them to model/components/ (models/components.py).
        self.head = head

    def final_hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The final hidden states the output projection scores: the decoder's, through the head."""
        hidden = base_model(self.lm).model(input_ids=input_ids, position_ids=position_ids,
                                           use_cache=False).last_hidden_state
        if self.head is None:
            return hidden
        out = self.head(hidden)
        if not isinstance(out, torch.Tensor) or out.shape != hidden.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"model.components.head {type(self.head).__name__} returned {got} for hidden states "
                             f"{tuple(hidden.shape)}; a head must return a tensor of the shape it is given")
        return out

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                labels: torch.Tensor | None = None, output: str = "loss",
                teacher: tuple[torch.Tensor, torch.Tensor] | None = None, divergence: str = "forward_kl",
                temperature: float = 1.0) -> torch.Tensor:
        """`output` "loss": summed loss over the labelled tokens; "token_logprobs": log p(label) per
        position (0 where unlabelled; DPO and RL sum them per sequence); "hidden": the final hidden
        states (a KD teacher's; through the head, if any); "distill": [divergence to the `teacher`
        (hidden states, output weights), cross-entropy], both summed over the labelled tokens. Without labels, the full
        logits (for the logit verifier and small checks only: that is the [tokens × vocab] tensor
        training avoids; every row, padding included)."""
        # Packed blocks: no attention mask, documents come from the restarting position ids.
        base = base_model(self.lm)
        check_isolates_documents(base)
        hidden = self.final_hidden(input_ids, position_ids)
        if output == "hidden":
            return hidden
        if labels is None:
            return hidden @ base.lm_head.weight.t()
        weight = output_weight(base)
        if output == "distill":
            assert teacher is not None
            kd = distill_loss(hidden, weight, teacher[0], teacher[1][:weight.shape[0]], labels, divergence,
                              temperature, self.chunk_tokens)
            return torch.stack([kd, chunked_cross_entropy(hidden, weight, labels, self.chunk_tokens)])
        if output == "token_logprobs":
            return token_logprobs(hidden, weight, labels, self.chunk_tokens)
        return chunked_cross_entropy(hidden, weight, labels, self.chunk_tokens)
