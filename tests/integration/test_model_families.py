"""The family matrix: every tiny family (`posttrain tiny-model --family`) through the training code.

On 2 CPU ranks (gloo, no Ray), per family: the model built on the meta device with each rank
loading its FSDP2 shard computes the plain HF model's logits (the logit verifier); tensor parallel
(degree 2) trains step for step like the plain model in one process (MoE: refused by the plan
check); LoRA on the family's usual targets trains a few SFT steps with a falling loss and exports,
and transformers reloads the export with the trained model's logits; vLLM (CPU) loads the export
and stops at the family's end-of-turn token; promotion's verified copy of the export is the export
(same logits, same tokenizer fingerprint). The matrix is printed at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.recipe import Recipe, RecipeError, load_recipe
from tests.conftest import REPO, SAMPLE_DATA, tiny_family, write_recipe
from tests.distributed import run_ranks

FAMILIES = ["llama", "qwen3", "gemma3", "mistral", "qwen3_moe"]
BLOCK = 96  # tokens per packed block of the SFT batch; longer than Gemma's 16-token window
STEPS = 3  # tensor-parallel steps compared with the plain model's
LORA_STEPS = 6


def sft_batch(base: str) -> dict[str, torch.Tensor]:
    """Two packed blocks of the sample chat data, tokenized and masked with the family's template."""
    from transformers import AutoTokenizer

    from posttrain.prep.chat import chat_examples
    from posttrain.prep.packing import pack
    from posttrain.prep.prepare import block_pad_id, read_jsonl
    from posttrain.uris import model_location

    tok = AutoTokenizer.from_pretrained(model_location(base))
    docs = []
    for _, row in read_jsonl(str(SAMPLE_DATA / "train.jsonl")):
        docs += [(ex.input_ids, ex.assistant_mask) for ex in chat_examples(tok, row["messages"])
                 if len(ex.input_ids) <= BLOCK]
        if len(docs) >= 12:
            break
    blocks = pack(docs, BLOCK, block_pad_id(tok))[:2]
    return {k: torch.tensor([getattr(b, k) for b in blocks]) for k in ("input_ids", "labels", "position_ids")}


def single_document(vocab: int, length: int = 40) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, vocab, (1, length), generator=gen),
            "position_ids": torch.arange(length)[None]}


def _train(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int, lr: float) -> list[float]:
    from posttrain.prep.packing import IGNORE

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, foreach=False)
    count = int((batch["labels"] != IGNORE).sum())
    losses = []
    for _ in range(steps):
        loss = model(**batch) / count
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def family_rank(rank: int, world: int, recipes: dict[str, dict[str, str]], out: str) -> dict:
    """On every rank, for every family: FSDP load + verifier logits; TP training steps; LoRA SFT
    steps and the export (rank 0 writes it)."""
    from posttrain.training_lib.export import export
    from posttrain.training_lib.models.verify import collective_logits, random_batch
    from posttrain.training_lib.parallel.parallelize import build_parallel_model, make_mesh
    from posttrain.training_lib.parallel.plan import make_plan

    def build(recipe_json: str):  # noqa: ANN202 - (model, report)
        recipe = Recipe.model_validate_json(recipe_json)
        plan = make_plan(recipe, world, "cpu")
        return (*build_parallel_model(recipe, plan, make_mesh(plan, "cpu")), recipe)

    results = {}
    for name, kinds in recipes.items():
        res: dict = {}
        model, report, recipe = build(kinds["fsdp"])
        vocab = model.lm.config.vocab_size
        res["fsdp_logits"] = collective_logits(model, random_batch(vocab, seq_len=48))
        res["fsdp_report"] = report.as_dict()
        batch = sft_batch(recipe.model.base)
        with torch.no_grad():
            res["fsdp_loss"] = float(model(**batch))
        if "tp" in kinds:
            tp_model, _, _ = build(kinds["tp"])
            res["tp_logits"] = collective_logits(tp_model, random_batch(vocab, seq_len=48))
            res["tp_losses"] = _train(tp_model, batch, STEPS, lr=1e-3)
            res["tp_param_types"] = sorted({type(p).__name__ for p in tp_model.parameters()})
        lora, _, recipe = build(kinds["lora"])
        res["lora_losses"] = _train(lora, batch, LORA_STEPS, lr=1e-2)
        # Token ids of the checkpoint's vocabulary: the export has no padding rows.
        real = getattr(lora.lm.get_base_model().config, "unpadded_vocab_size", vocab)
        res["trained_logits"] = collective_logits(lora, single_document(real))
        folder = export(lora, recipe, Path(out) / name, rank)
        res["export"] = str(folder) if folder else None
        results[name] = res
    return results


def _recipes(tmp_path: Path, name: str, model_dir: Path) -> dict[str, str]:
    from posttrain.training_lib.models.families import family

    def recipe(kind: str, lora: dict | None = None, **sections: dict) -> str:
        return load_recipe(write_recipe(tmp_path / name / kind, model={"base": str(model_dir), "lora": lora},
                                        compute={"workers": 2}, **sections)).model_dump_json()

    targets = list(family(name).lora_targets)
    out = {"fsdp": recipe("fsdp", training={"max_steps": 4, "sharding": "fsdp"}),
           "lora": recipe("lora", lora={"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": targets})}
    if name != "qwen3_moe":  # refused by the plan check (test_moe_tensor_parallel_is_refused)
        out["tp"] = recipe("tp", training={"max_steps": 4, "sharding": "fsdp_tp", "tensor_parallel": 2})
    return out


def _reference(recipe_json: str) -> torch.nn.Module:
    from posttrain.training_lib.models.loading import load_for_training
    from posttrain.training_lib.models.with_loss import CausalLMWithLoss

    recipe = Recipe.model_validate_json(recipe_json)
    return CausalLMWithLoss(load_for_training(recipe), recipe.training.loss_chunk_tokens)


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("families")
    dirs = {name: tiny_family(name) for name in FAMILIES}
    recipes = {name: _recipes(tmp, name, d) for name, d in dirs.items()}
    ranks = run_ranks(family_rank, 2, tmp / "ranks", recipes, str(tmp / "export"))
    exports = [ranks[0][n]["export"] for n in FAMILIES]
    out = tmp / "vllm.json"
    subprocess.run([sys.executable, "-m", "tests.integration.family_vllm", str(out), *exports], check=True, cwd=REPO,
                   timeout=600)
    vllm = json.loads(out.read_text())
    return {"dirs": dirs, "recipes": recipes, "ranks": ranks, "vllm": {n: vllm[e] for n, e in zip(FAMILIES, exports,
                                                                                                  strict=True)},
            "cells": {n: {} for n in FAMILIES}}


@pytest.mark.parametrize("name", FAMILIES)
def test_sharded_load_matches_the_plain_model(matrix: dict, name: str) -> None:
    from posttrain.training_lib.models.verify import collective_logits, compare_logits, random_batch

    reference = _reference(matrix["recipes"][name]["fsdp"])
    want = collective_logits(reference, random_batch(reference.lm.config.vocab_size, seq_len=48))
    diffs = [compare_logits(r[name]["fsdp_logits"], want) for r in matrix["ranks"]]
    full = matrix["ranks"][0][name]["fsdp_report"]["full_bytes"]
    for r in matrix["ranks"]:  # each rank read about half the model (an uneven row split at most)
        assert r[name]["fsdp_report"]["bytes_read"] < 0.6 * full
    # The vocabulary padded at load (non-llama families: their checkpoints are unpadded) leaves the
    # loss of the checkpoint's own, unpadded model: the padding rows never enter the softmax.
    from transformers import AutoModelForCausalLM

    from posttrain.training_lib.models.attention import register
    from posttrain.training_lib.models.with_loss import CausalLMWithLoss

    plain = CausalLMWithLoss(AutoModelForCausalLM.from_pretrained(matrix["dirs"][name], attn_implementation=register()))
    with torch.no_grad():
        want_loss = float(plain(**sft_batch(str(matrix["dirs"][name]))))
    assert [r[name]["fsdp_loss"] for r in matrix["ranks"]] == pytest.approx([want_loss] * 2, rel=1e-5)
    # A tied family's output layer is its embedding, one parameter, in the model the ranks build.
    from posttrain.training_lib.models.loading import build_on_meta

    meta = build_on_meta(Recipe.model_validate_json(matrix["recipes"][name]["fsdp"]))
    assert (meta.lm_head.weight is meta.model.embed_tokens.weight) == meta.config.tie_word_embeddings
    matrix["cells"][name]["load/verify"] = f"ok ({max(diffs):.1e})"


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "qwen3_moe"])
def test_tensor_parallel_trains_step_for_step_like_one_process(matrix: dict, name: str) -> None:
    from posttrain.training_lib.models.verify import collective_logits, compare_logits, random_batch

    recipe_json = matrix["recipes"][name]["tp"]
    reference = _reference(recipe_json)
    want = collective_logits(reference, random_batch(reference.lm.config.vocab_size, seq_len=48))
    want_losses = _train(reference, sft_batch(Recipe.model_validate_json(recipe_json).model.base), STEPS, lr=1e-3)
    for r in matrix["ranks"]:
        compare_logits(r[name]["tp_logits"], want)
        # AdamW turns float32 rounding in tiny gradients into ~1e-5 relative steps; the bugs this
        # guards against (an untied output layer, stale root parameters) move the loss by 3e-3 or more.
        assert r[name]["tp_losses"] == pytest.approx(want_losses, rel=1e-4)
        assert r[name]["tp_param_types"] == ["DTensor"]
    matrix["cells"][name]["TP"] = "ok"


def test_moe_tensor_parallel_is_refused(matrix: dict, tmp_path: Path) -> None:
    from posttrain.planning import check_plan
    from posttrain.training_lib.parallel.parallelize import tp_plan

    recipe = load_recipe(write_recipe(tmp_path, model={"base": str(matrix["dirs"]["qwen3_moe"])},
                                      training={"max_steps": 4, "sharding": "fsdp_tp", "tensor_parallel": 2}))
    with pytest.raises(RecipeError, match="tensor parallel is not supported for MoE yet"):
        check_plan(recipe)
    with pytest.raises(ValueError, match="no tensor-parallel plan for model_type 'qwen3_moe'"):
        tp_plan("qwen3_moe")
    matrix["cells"]["qwen3_moe"]["TP"] = "refused (plan check)"


@pytest.mark.parametrize("name", FAMILIES)
def test_lora_sft_loss_falls_and_the_export_reloads_with_the_same_logits(matrix: dict, name: str) -> None:
    from transformers import AutoModelForCausalLM

    losses = [r[name]["lora_losses"] for r in matrix["ranks"]]
    assert losses[0] == losses[1]  # one model, sharded
    assert losses[0][-1] < losses[0][0] - 0.05, losses[0]
    folder = Path(matrix["ranks"][0][name]["export"])
    assert (folder.parent / "adapter" / "adapter_config.json").exists()
    # The export keeps the family's generation config: every token a reply may end with.
    def eos(d: Path) -> object:
        return json.loads((d / "generation_config.json").read_text())["eos_token_id"]

    assert eos(folder) == eos(matrix["dirs"][name])
    reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # transformers' own attention
    doc = single_document(reloaded.config.vocab_size)
    with torch.no_grad():
        got = reloaded(**doc).logits
    # The export has the checkpoint's vocabulary: the padding rows added at load are gone.
    checkpoint = json.loads((matrix["dirs"][name] / "config.json").read_text())["vocab_size"]
    assert reloaded.config.vocab_size == checkpoint
    trained = matrix["ranks"][0][name]["trained_logits"]
    diff = float((got - trained[..., :checkpoint]).abs().max())
    assert diff < 1e-4
    matrix["cells"][name]["LoRA"] = f"ok ({losses[0][0]:.2f}→{losses[0][-1]:.2f})"
    matrix["cells"][name]["export"] = f"ok ({diff:.1e})"


@pytest.mark.parametrize("name", FAMILIES)
def test_vllm_loads_the_export_and_stops_at_the_end_of_turn_token(matrix: dict, name: str) -> None:
    from posttrain.training_lib.models.families import family
    from tests.integration.family_vllm import MIN_TOKENS

    out = matrix["vllm"][name]
    assert out["ok"], out.get("trace")
    assert out["end_of_turn"] == family(name).end_of_turn
    assert out["end_of_turn_id"] in out["stop_ids"]
    assert out["finish_reason"] == "stop"
    assert out["token_ids"][-1] == out["end_of_turn_id"] and len(out["token_ids"]) == MIN_TOKENS + 1
    matrix["cells"][name]["vLLM"] = "ok"
    matrix["cells"][name]["stop token"] = out["end_of_turn"]


@pytest.mark.parametrize("name", FAMILIES)
def test_the_promoted_champion_is_the_export(matrix: dict, name: str, tmp_path: Path) -> None:
    """Promotion's copy (storage_promote.copy_tree_verified, as the promote task makes it) of the
    family's export: transformers loads it with the export's logits, and its tokenizer is the base
    model's (same fingerprint: the next run's comparison with this champion pairs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.prep.tokenizer import tokenizer_fingerprint
    from posttrain.storage_fs import COMMIT, Store
    from posttrain.storage_promote import copy_tree_verified

    export = Path(matrix["ranks"][0][name]["export"])
    champion = tmp_path / "promoted" / "v1"
    files = copy_tree_verified(Store.at(str(export)), Store.at(str(champion)))
    assert json.loads((champion / COMMIT).read_text())["files"] == files
    assert {"config.json", "generation_config.json", "model.safetensors"} <= set(files)
    models = [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in (export, champion)]
    doc = single_document(models[0].config.vocab_size)
    with torch.no_grad():
        assert torch.equal(models[0](**doc).logits, models[1](**doc).logits)
    base = AutoTokenizer.from_pretrained(matrix["dirs"][name])
    promoted = AutoTokenizer.from_pretrained(champion)
    assert tokenizer_fingerprint(promoted) == tokenizer_fingerprint(base)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert promoted.apply_chat_template(chat, tokenize=False) == base.apply_chat_template(chat, tokenize=False)
    matrix["cells"][name]["promote"] = "ok"


def test_print_the_matrix(matrix: dict, capsys: pytest.CaptureFixture) -> None:
    columns = ["load/verify", "LoRA", "TP", "export", "vLLM", "stop token", "promote"]
    rows = [["family", *columns]] + [[n, *(matrix["cells"][n].get(c, "FAILED") for c in columns)] for n in FAMILIES]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns) + 1)]
    with capsys.disabled():
        print("\n" + "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows))
    assert all(c != "FAILED" for r in rows for c in r)
