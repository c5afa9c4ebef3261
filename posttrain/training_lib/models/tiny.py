"""The tiny debug model every test, the demo and CI share: built offline, in seconds.

A byte-level BPE tokenizer trained on the repo's sample chat text, wrapped as a real Hugging Face
tokenizer with a ChatML-style chat template, and a randomly initialised Llama-architecture model.
head_dim is 32 because vLLM's CPU attention kernels accept nothing smaller; the vocabulary is
padded to a multiple of 64 so the embedding shards evenly.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from posttrain import samples

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(texts: list[str], vocab_size: int = 500):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(vocab_size: int, pad_to_multiple_of: int = 64, seed: int = 0, hidden_size: int = 64,
                layers: int = 2, heads: int = 2, max_positions: int = 2048):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    padded = -(-vocab_size // pad_to_multiple_of) * pad_to_multiple_of
    config = LlamaConfig(
        vocab_size=padded,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden_size // heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def build_tiny(out_dir: str | Path, seed: int = 0, pad_to_multiple_of: int = 64) -> Path:
    """Write a tokenizer + model to out_dir (Hugging Face layout, safetensors)."""
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        paths = samples.generate(tmp)
        tokenizer = build_tokenizer(samples.corpus_text(paths["train"]))
    model = build_model(len(tokenizer), pad_to_multiple_of=pad_to_multiple_of, seed=seed)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
