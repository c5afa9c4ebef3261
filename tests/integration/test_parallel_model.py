"""The parallel model on 2 CPU ranks (gloo, no Ray): each rank loads only its shard from the
safetensors files, and the sharded model (FSDP2, tensor parallel, compiled) computes the same
logits and gradients as the plain model in one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain.recipe import Recipe, load_recipe
from tests.conftest import write_recipe
from tests.distributed import run_ranks

SEQ = 48


def _build(recipe: Recipe, world: int):  # noqa: ANN202 - (model, plan, report)
    from posttrain.training_lib.parallel.parallelize import build_parallel_model, make_mesh
    from posttrain.training_lib.parallel.plan import make_plan

    plan = make_plan(recipe, world, "cpu")
    return (*build_parallel_model(recipe, plan, make_mesh(plan, "cpu")), plan)


def _reference(recipe: Recipe) -> torch.nn.Module:
    from posttrain.training_lib.models.loading import load_for_training
    from posttrain.training_lib.models.with_loss import CausalLMWithLoss

    torch.manual_seed(recipe.training.seed)
    return CausalLMWithLoss(load_for_training(recipe), recipe.training.loss_chunk_tokens)


def logits_and_grads(rank: int, world: int, recipe_json: str) -> dict:
    """On every rank: build the parallel model, run the verifier batch forward and backward."""
    from posttrain.training_lib.models.sharded_load import checkpoint_name
    from posttrain.training_lib.models.verify import collective_logits, random_batch

    recipe = Recipe.model_validate_json(recipe_json)
    model, report, plan = _build(recipe, world)
    batch = random_batch(vocab=500, seq_len=SEQ)
    logits = collective_logits(model, batch)
    model(**batch).backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[checkpoint_name(name)] = g.detach().clone()
    kinds = sorted({type(p).__name__ for p in model.parameters()})
    from torch._dynamo.utils import counters

    from posttrain.training_lib.grad_clip import clip_grad_norm

    grad_norm = clip_grad_norm(list(model.parameters()), max_norm=1e9)  # across the dp and (dp, tp) meshes
    return {"logits": logits, "grads": grads, "grad_norm": grad_norm, "report": report.as_dict(),
            "plan": plan.as_dict(), "param_types": kinds, "compiled_graphs": counters["stats"]["unique_graphs"]}


def reference_logits_and_grads(recipe: Recipe) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from posttrain.training_lib.models.sharded_load import checkpoint_name
    from posttrain.training_lib.models.verify import collective_logits, random_batch

    model = _reference(recipe)
    batch = random_batch(vocab=500, seq_len=SEQ)
    logits = collective_logits(model, batch)
    model(**batch).backward()
    return logits, {checkpoint_name(n): p.grad for n, p in model.named_parameters() if p.grad is not None}


def _recipe(tmp_path: Path, **training) -> Recipe:  # noqa: ANN003
    return load_recipe(write_recipe(tmp_path, training={"max_steps": 4, **training}, compute={"workers": 2}))


def _assert_same_grads(got: dict, want: dict, grad_norm: float) -> None:
    assert set(got) == set(want)
    want_norm = float(torch.nn.utils.get_total_norm(list(want.values())))
    assert grad_norm == pytest.approx(want_norm, rel=1e-5)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_fsdp_ranks_load_only_their_shard_and_match_the_plain_model(tmp_path: Path, tiny_model: Path) -> None:
    from posttrain.training_lib.models.verify import compare_logits

    recipe = _recipe(tmp_path, sharding="fsdp")
    ranks = run_ranks(logits_and_grads, 2, tmp_path / "ranks", recipe.model_dump_json())
    full = ranks[0]["report"]["full_bytes"]
    for r in ranks:
        # Each rank holds and reads half the model (the odd row of an uneven split at most).
        assert r["report"]["local_bytes"] <= full / 2 + 4 * 512
        assert r["report"]["bytes_read"] <= full / 2 + 4 * 512
        assert r["report"]["bytes_read"] > full / 2 - 4 * 512
        assert r["param_types"] == ["DTensor"]
    assert sum(r["report"]["local_bytes"] for r in ranks) == full
    want_logits, want_grads = reference_logits_and_grads(recipe)
    for r in ranks:
        compare_logits(r["logits"], want_logits)
        _assert_same_grads(r["grads"], want_grads, r["grad_norm"])


def test_tensor_parallel_matches_single_rank_logits_and_gradients(tmp_path: Path, tiny_model: Path) -> None:
    from posttrain.training_lib.models.verify import compare_logits

    recipe = _recipe(tmp_path, sharding="fsdp_tp", tensor_parallel=2)
    ranks = run_ranks(logits_and_grads, 2, tmp_path / "ranks", recipe.model_dump_json())
    assert ranks[0]["plan"]["strategy"] == "fsdp_tp" and ranks[0]["plan"]["data_parallel"] == 1
    want_logits, want_grads = reference_logits_and_grads(recipe)
    for r in ranks:
        compare_logits(r["logits"], want_logits)
        _assert_same_grads(r["grads"], want_grads, r["grad_norm"])
        # The block's projections are split over the 2 TP ranks: each reads about half of them.
        assert r["report"]["bytes_read"] < 0.75 * r["report"]["full_bytes"]


@pytest.mark.slow
def test_compiled_blocks_run_on_the_cpu_and_match_eager(tmp_path: Path, tiny_model: Path) -> None:
    from posttrain.training_lib.models.verify import compare_logits

    recipe = _recipe(tmp_path, sharding="fsdp", compile=True, activation_checkpointing=True)
    (rank,) = run_ranks(logits_and_grads, 1, tmp_path / "ranks", recipe.model_dump_json())
    assert rank["plan"]["compile"] is True and rank["compiled_graphs"] >= 1
    want_logits, want_grads = reference_logits_and_grads(recipe)
    compare_logits(rank["logits"], want_logits)
    _assert_same_grads(rank["grads"], want_grads, rank["grad_norm"])
