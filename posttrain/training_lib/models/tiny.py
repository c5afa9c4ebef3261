"""The tiny debug models every test, the demo and CI share: built offline, in seconds.

A byte-level BPE tokenizer trained on the repo's sample chat text, wrapped as a real Hugging Face
tokenizer carrying the family's special tokens and chat template, and a randomly initialised model
of the family's architecture (families.py). The default, `llama`, is the shared debug model: a
ChatML-style template and a vocabulary padded to a multiple of 64 so the embedding shards evenly.
head_dim is 32 because vLLM's CPU attention kernels accept nothing smaller.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from posttrain import samples
from posttrain.prep.chat import tokenize_chat
from posttrain.prep.packing import IGNORE, pack
from posttrain.prep.prepare import block_pad_id, read_jsonl
from posttrain.training_lib.models.families import FAMILIES, TinyFamily, build_config, family

# torch, tokenizers and transformers (and the torch modules of this package) are imported inside the
# functions: the `posttrain tiny-model` CLI imports this module and must stay light.

LLAMA = FAMILIES["llama"]
CHAT_TEMPLATE = LLAMA.chat_template()
SPECIAL_TOKENS = list(LLAMA.special_tokens)


def build_tokenizer(texts: list[str], vocab_size: int = 500, fam: TinyFamily = LLAMA):
    """A byte-level BPE trained on `texts` with the family's special tokens first (ids 0, 1, ...),
    its BOS/EOS/PAD/UNK roles and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(fam.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=fam.eos,
        pad_token=fam.pad,
        bos_token=fam.bos,
        unk_token=fam.unk,
        model_max_length=4096,
    )
    tokenizer.chat_template = fam.chat_template()
    return tokenizer


def build_model(vocab_size: int, pad_to_multiple_of: int = 64, seed: int = 0, max_positions: int = 2048,
                fam: TinyFamily = LLAMA):
    import torch
    from transformers import AutoModelForCausalLM

    padded = -(-vocab_size // pad_to_multiple_of) * pad_to_multiple_of
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(build_config(fam, padded, max_positions), dtype=torch.float32)


def build_tiny(out_dir: str | Path, seed: int = 0, pad_to_multiple_of: int | None = None,
               family_name: str = "llama") -> Path:
    """Write a tokenizer + model of the family to out_dir (Hugging Face layout, safetensors).
    `pad_to_multiple_of` None: the family's own (64 for llama, none for the others)."""
    fam = family(family_name)
    out = Path(out_dir)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        paths = samples.generate(tmp)
        tokenizer = build_tokenizer(samples.corpus_text(paths["train"]), fam.vocab_size, fam)
    model = build_model(len(tokenizer), pad_to_multiple_of=pad_to_multiple_of or fam.pad_to_multiple_of, seed=seed,
                        fam=fam)
    ids = {role: tokenizer.convert_tokens_to_ids(tok) if tok else None
           for role, tok in (("eos", fam.eos), ("pad", fam.pad), ("bos", fam.bos))}
    for config in (model.config, model.generation_config):
        config.eos_token_id, config.pad_token_id, config.bos_token_id = ids["eos"], ids["pad"], ids["bos"]
    if fam.generation_eos:  # the family stops generation at its end-of-turn token too
        model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids(t) for t in fam.generation_eos]
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
