"""The model families `posttrain tiny-model --family` builds: each one's architecture (a transformers
config), its special tokens and chat template (the family's real template, posttrain/templates/),
and the LoRA targets its fine-tunes usually use.

Every tiny model keeps head_dim at 32 (vLLM's CPU attention kernels accept nothing smaller), hidden
64 and 2 layers. The non-Llama families keep their vocabulary at the tokenizer's size, on purpose not
a multiple of 64 (real checkpoints aren't always), so loading has to pad it; `llama` is the shared
debug model of every other test (ChatML template, vocabulary padded to 512). Torch-free: the CLI
imports it; transformers is imported only when a config is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"

# ChatML-style, as the tiny Llama has always spoken (tests and the demo's sample data rely on it).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = [*ATTENTION, "gate_proj", "up_proj", "down_proj"]
_QWEN_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
                "<tool_response>", "</tool_response>")


@dataclass(frozen=True)
class TinyFamily:
    name: str
    model_type: str  # config.json's model_type
    special_tokens: tuple[str, ...]  # in id order from 0, as the family numbers them where it matters
    eos: str  # the tokenizer's EOS
    end_of_turn: str  # closes an assistant reply in the chat template
    vocab_size: int  # the trained tokenizer's size (= config vocab_size unless padded)
    template_file: str | None  # under posttrain/templates; None: CHATML_TEMPLATE
    pad: str | None = None
    bos: str | None = None
    unk: str | None = None
    generation_eos: tuple[str, ...] = ()  # generation_config.json eos_token_id, as the family ships it
    lora_targets: tuple[str, ...] = tuple(ALL_LINEAR)
    pad_to_multiple_of: int = 1  # 1: the config's vocabulary is the tokenizer's, unpadded
    config: dict[str, Any] = field(default_factory=dict)  # architecture settings beyond the shared ones

    def chat_template(self) -> str:
        if self.template_file is None:
            return CHATML_TEMPLATE
        return (TEMPLATES / self.template_file).read_text(encoding="utf-8")


_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "head_dim": 32, "intermediate_size": 128,
          "num_attention_heads": 4, "num_key_value_heads": 2}

FAMILIES: dict[str, TinyFamily] = {f.name: f for f in [
    TinyFamily("llama", "llama", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), eos="<|im_end|>",
               end_of_turn="<|im_end|>", vocab_size=500, template_file=None, pad="<|endoftext|>",
               lora_targets=("q_proj", "v_proj"), pad_to_multiple_of=64,
               config={"num_attention_heads": 2, "num_key_value_heads": 2, "tie_word_embeddings": False}),
    # Qwen3 0.6B–4B tie the embedding; q_norm/k_norm normalise each head.
    TinyFamily("qwen3", "qwen3", _QWEN_TOKENS, eos="<|im_end|>", end_of_turn="<|im_end|>", vocab_size=437,
               template_file="qwen3.jinja", pad="<|endoftext|>", generation_eos=("<|im_end|>", "<|endoftext|>"),
               config={"tie_word_embeddings": True}),
    # Gemma 3: pad/eos/bos/unk are ids 0–3; tied embedding scaled by √hidden; four norms per block
    # and q/k norms; sliding-window layers (window 16 here, so the tests' 48–64-token blocks cross it)
    # interleaved with full ones; attention scaled by query_pre_attn_scalar (= head_dim, as in 1B).
    TinyFamily("gemma3", "gemma3_text", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                                         "<start_of_image>"),
               eos="<eos>", end_of_turn="<end_of_turn>", vocab_size=451, template_file="gemma3.jinja", pad="<pad>",
               bos="<bos>", unk="<unk>", generation_eos=("<eos>", "<end_of_turn>"),
               config={"tie_word_embeddings": True, "query_pre_attn_scalar": 32, "sliding_window": 16,
                       "layer_types": ["sliding_attention", "full_attention"]}),
    # Mistral v0.3: <unk> <s> </s> are ids 0–2, then the control tokens; untied; no sliding window.
    TinyFamily("mistral", "mistral", ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                                      "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
               eos="</s>", end_of_turn="</s>", vocab_size=389, template_file="mistral_v0_3.jinja", bos="<s>",
               unk="<unk>", generation_eos=("</s>",), config={"tie_word_embeddings": False, "sliding_window": None}),
    # Qwen3-MoE (30B-A3B's layout): every block sparse, 4 experts of which 2 per token, no shared
    # expert, untied. The experts are 3-D parameters (transformers 5 fuses them): LoRA on attention.
    TinyFamily("qwen3_moe", "qwen3_moe", _QWEN_TOKENS, eos="<|im_end|>", end_of_turn="<|im_end|>", vocab_size=437,
               template_file="qwen3.jinja", pad="<|endoftext|>", generation_eos=("<|im_end|>", "<|endoftext|>"),
               lora_targets=tuple(ATTENTION),
               config={"tie_word_embeddings": False, "num_experts": 4, "num_experts_per_tok": 2,
                       "moe_intermediate_size": 32, "decoder_sparse_step": 1, "mlp_only_layers": [],
                       "norm_topk_prob": True}),
]}


def family(name: str) -> TinyFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def build_config(fam: TinyFamily, vocab_size: int, max_positions: int = 2048) -> Any:
    """The transformers config of the family's tiny model (random initialisation, nothing downloaded)."""
    from transformers import AutoConfig

    settings = {**_SHAPE, **fam.config}
    if fam.name == "llama":  # the shared debug model's shape, unchanged: hidden/heads = head_dim
        settings["head_dim"] = settings["hidden_size"] // settings["num_attention_heads"]
    return AutoConfig.for_model(fam.model_type, vocab_size=vocab_size, max_position_embeddings=max_positions,
                                bos_token_id=None, eos_token_id=None, pad_token_id=None, dtype="float32",
                                **settings)
