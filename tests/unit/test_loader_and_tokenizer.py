"""Offline-packed blocks are dealt to data-parallel ranks without overlap, deterministically and
resumably; a tokenizer other than the one the data was prepared with is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.prep.tokenizer import TokenizerMismatch, require_same_tokenizer, tokenizer_fingerprint
from posttrain.recipe import Recipe, TrainingConfig
from posttrain.training_lib.data.loader import PackedLoader, steps_for


def blocks(n: int) -> dict[str, torch.Tensor]:
    ids = torch.arange(n).unsqueeze(1).repeat(1, 8)  # block i is full of the value i
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(8).repeat(n, 1)}


def test_ranks_get_disjoint_blocks_each_epoch_and_the_same_number_of_batches() -> None:
    data = blocks(21)
    loaders = [PackedLoader(data, rank, 2, micro_batch_size=2, seed=5) for rank in range(2)]
    assert loaders[0].batches_per_epoch == loaders[1].batches_per_epoch == 5  # 21 // (2 × 2)
    seen = [{int(v) for _ in range(5) for v in loader.next_batch()["input_ids"][:, 0]} for loader in loaders]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 20


@pytest.mark.parametrize(("n", "world", "mbs", "ga", "epochs"),
                         [(21, 2, 2, 1, 2), (37, 2, 1, 3, 3), (10, 4, 2, 2, 1), (50, 1, 2, 2, 2), (9, 2, 4, 2, 2)])
def test_epochs_over_data_parallel_ranks_see_each_block_once_per_epoch(n: int, world: int, mbs: int, ga: int,
                                                                       epochs: int) -> None:
    """What the SFT and KD loops run: steps_for(...) steps of grad_accum micro-batches on every rank."""
    training = TrainingConfig(max_steps=None, epochs=epochs, micro_batch_size=mbs, grad_accum=ga)
    steps = steps_for(Recipe.model_construct(training=training), n, world)
    per_epoch = steps // epochs
    assert per_epoch == max(1, n // (world * mbs * ga)) and steps == epochs * per_epoch
    loaders = [PackedLoader(blocks(n), rank, world, mbs, seed=3, grad_accum=ga) for rank in range(world)]
    seen = [[[int(v) for _ in range(per_epoch * ga) for v in loader.next_batch()["input_ids"][:, 0]]
             for _ in range(epochs)] for loader in loaders]
    for epoch in range(epochs):
        mine = [seen[rank][epoch] for rank in range(world)]
        everyone = [b for blocks_of_rank in mine for b in blocks_of_rank]
        assert all(len(m) == per_epoch * ga * mbs for m in mine)  # every rank, the same count
        if per_epoch * ga * mbs * world <= n:
            # An epoch: each block at most once over all ranks, all but the last partial step's.
            assert len(set(everyone)) == len(everyone) and n - len(everyone) < world * mbs * ga
        else:  # fewer blocks than one step takes: each block as often as the others, ±1
            counts = [everyone.count(b) for b in range(n)]
            assert max(counts) - min(counts) <= 1
    # The loaders' epochs end exactly where the steps say: the next batch opens the next epoch.
    assert all(loader.state.epoch == epochs - 1 and loader.state.batch == per_epoch * ga for loader in loaders)


def test_loader_resumes_where_it_stopped() -> None:
    data = blocks(13)
    straight = PackedLoader(data, 1, 2, 1, seed=0)
    expected = [straight.next_batch()["input_ids"].tolist() for _ in range(15)]
    first = PackedLoader(data, 1, 2, 1, seed=0)
    got = [first.next_batch()["input_ids"].tolist() for _ in range(7)]
    again = PackedLoader(data, 1, 2, 1, seed=0)
    again.load_state_dict(first.state_dict())
    got += [again.next_batch()["input_ids"].tolist() for _ in range(8)]
    assert got == expected


def test_a_different_tokenizer_is_refused(tiny_model: Path, tokenizer, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    manifest = {"tokenizer": {"uri": str(tiny_model), "fingerprint": tokenizer_fingerprint(tokenizer)}}
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(manifest))
    assert require_same_tokenizer(str(tiny_model), tmp_path) is not None

    other = tmp_path / "other-tokenizer"
    changed = tokenizer.__class__.from_pretrained(tiny_model)
    changed.chat_template = changed.chat_template.replace("<|im_end|>\n", "<|im_end|>\n\n")
    changed.save_pretrained(other)
    with pytest.raises(TokenizerMismatch, match="was prepared with"):
        require_same_tokenizer(str(other), tmp_path)


def _swap_first_merges(t: dict) -> None:
    t["model"]["merges"][:2] = t["model"]["merges"][1::-1]  # same merges, another rank order


def _swap_two_ids(t: dict) -> None:
    vocab = t["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]


def _post_processor_adds_bos(t: dict) -> None:
    t["post_processor"]["single"].insert(0, {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}})
    t["post_processor"]["special_tokens"] = {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0],
                                                              "tokens": ["<|endoftext|>"]}}


def _added_token(t: dict) -> None:
    t["added_tokens"].append({"id": len(t["model"]["vocab"]), "content": "<|tool|>", "single_word": False,
                              "lstrip": False, "rstrip": False, "normalized": False, "special": True})


def _set(key: str, value: object):  # noqa: ANN202
    return lambda t: t.__setitem__(key, value)


def _flag(name: str):  # noqa: ANN202
    # On <|im_start|>: eos and pad are marked special again at load whatever the file says.
    return lambda t: t["added_tokens"][1].__setitem__(name, not t["added_tokens"][1][name])


TOKENIZER_JSON_CHANGES = {
    "a merge's rank": _swap_first_merges,
    "two ids": _swap_two_ids,
    "the normalizer": _set("normalizer", {"type": "NFKC"}),
    "the pre-tokenizer": _set("pre_tokenizer", {"type": "ByteLevel", "add_prefix_space": True,
                                                "trim_offsets": True, "use_regex": True}),
    "the post-processor": _post_processor_adds_bos,
    "the decoder": _set("decoder", {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                    "use_regex": True}),
    "an added token": _added_token,
    "an added token's lstrip": _flag("lstrip"),
    "an added token's rstrip": _flag("rstrip"),
    "an added token's normalized": _flag("normalized"),
    "an added token's special": _flag("special"),
}


def _tokenizer_copy(tiny_model: Path, folder: Path, change_json=None, change_config=None,  # noqa: ANN001
                    change_template=None):  # noqa: ANN001, ANN202
    from transformers import AutoTokenizer

    folder.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).write_bytes((tiny_model / name).read_bytes())
    for name, change in (("tokenizer.json", change_json), ("tokenizer_config.json", change_config)):
        if change:
            data = json.loads((folder / name).read_text())
            change(data)
            (folder / name).write_text(json.dumps(data))
    if change_template:
        (folder / "chat_template.jinja").write_text(change_template((folder / "chat_template.jinja").read_text()))
    return AutoTokenizer.from_pretrained(folder)


def test_the_fingerprint_covers_the_whole_tokenizer(tiny_model: Path, tmp_path: Path) -> None:
    base = tokenizer_fingerprint(_tokenizer_copy(tiny_model, tmp_path / "same"))
    again = _tokenizer_copy(tiny_model, tmp_path / "again")
    assert tokenizer_fingerprint(again) == base  # loaded twice: the same
    again.backend_tokenizer.enable_truncation(16)
    again.backend_tokenizer.enable_padding(length=32)
    assert tokenizer_fingerprint(again) == base  # per-call truncation/padding state does not count

    changed = {what: _tokenizer_copy(tiny_model, tmp_path / f"json-{i}", change_json=change)
               for i, (what, change) in enumerate(TOKENIZER_JSON_CHANGES.items())}
    changed["the chat template"] = _tokenizer_copy(
        tiny_model, tmp_path / "template", change_template=lambda s: s.replace("<|im_end|>\n", "<|im_end|>\n\n"))
    changed["the eos token"] = _tokenizer_copy(
        tiny_model, tmp_path / "eos", change_config=lambda c: c.__setitem__("eos_token", "<|endoftext|>"))
    changed["the pad token"] = _tokenizer_copy(
        tiny_model, tmp_path / "pad", change_config=lambda c: c.__setitem__("pad_token", "<|im_start|>"))
    prints = {what: tokenizer_fingerprint(t) for what, t in changed.items()}
    assert [what for what, fp in prints.items() if fp == base] == []
    assert len(set(prints.values())) == len(prints)  # and no two changes collide
