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
from posttrain.prep.chat import tokenize_chat
from posttrain.prep.packing import IGNORE, pack
from posttrain.prep.prepare import block_pad_id, read_jsonl

# torch, tokenizers and transformers (and the torch modules of this package) are imported inside the
# functions: the `posttrain tiny-model` CLI imports this module and must stay light.

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


def build_tiny_teacher(out_dir: str | Path, base: str | Path, chat_jsonl: str | Path, steps: int = 40,
                       seq_len: int = 256, lr: float = 3e-3, seed: int = 0) -> Path:
    """A teacher for the distillation demo and tests: the tiny model fine-tuned briefly (SFT, in
    this process, on the sample chat data's packed blocks), saved with the same tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.training_lib.models.attention import register
    from posttrain.training_lib.models.with_loss import CausalLMWithLoss

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    docs = []
    for _lineno, row in read_jsonl(str(chat_jsonl)):
        tok = tokenize_chat(tokenizer, row["messages"])
        if len(tok.input_ids) <= seq_len:
            docs.append((tok.input_ids, tok.assistant_mask))
    blocks = pack(docs, seq_len, block_pad_id(tokenizer))
    lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation=register())
    model = CausalLMWithLoss(lm).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        picked = [blocks[(step * 4 + i) % len(blocks)] for i in range(4)]
        batch = {k: torch.tensor([getattr(b, k) for b in picked]) for k in ("input_ids", "labels", "position_ids")}
        loss = model(**batch) / int((batch["labels"] != IGNORE).sum())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lm.config.use_cache = True
    lm.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
