"""The DPO, KD and GRPO pieces on CUDA, through the real FSDP2 model in bf16: sequence log-probs of
packed preference pairs, the chunked distillation divergence with a frozen teacher built on the
same mesh, and a GRPO update step, each against the same computation in fp32 on the CPU. Skipped
without a GPU; run with `bash tests/gpu/run_on_device.sh`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain.recipe import Recipe, load_recipe
from tests.conftest import write_recipe
from tests.distributed import run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


def _pairs() -> list:
    g = torch.Generator().manual_seed(0)
    pairs = []
    for n in (20, 33, 17, 41):
        prompt = torch.randint(3, 400, (n,), generator=g).tolist()
        chosen = prompt + torch.randint(3, 400, (9,), generator=g).tolist()
        rejected = prompt + torch.randint(3, 400, (12,), generator=g).tolist()
        pairs.append((chosen, [False] * n + [True] * 9, rejected, [False] * n + [True] * 12))
    return pairs


def paradigm_outputs(rank: int, world: int, recipe_json: str, device: str) -> dict:
    from posttrain.training_lib.data.pairs import collate_pairs
    from posttrain.training_lib.losses.grpo import grpo_loss
    from posttrain.training_lib.losses.logprobs import pair_logprobs
    from posttrain.training_lib.models.with_loss import base_model
    from posttrain.training_lib.parallel.parallelize import build_frozen_model, build_parallel_model, make_mesh
    from posttrain.training_lib.parallel.plan import make_plan
    from posttrain.training_lib.rl.policy import collate_rollouts

    recipe = Recipe.model_validate_json(recipe_json)
    plan = make_plan(recipe, world, device)
    mesh = make_mesh(plan, device)
    model, _ = build_parallel_model(recipe, plan, mesh)
    teacher, _ = build_frozen_model(recipe, plan, mesh, recipe.model.base)
    out: dict = {"dtype": plan.param_dtype}
    batch = collate_pairs(_pairs(), pad_id=0)
    n = int(batch.pop("num_sequences"))
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.no_grad():
        out["pairs"] = pair_logprobs(model, batch, n, 4).float().cpu()
        t_hidden = teacher(**batch, output="hidden")
    # KD: the teacher is the same base model, so the divergence is ~0 and its gradient too.
    pair = model(**batch, output="distill", teacher=(t_hidden, base_model(teacher.lm).lm_head.weight))
    out["kd"] = pair.detach().float().cpu()
    # GRPO: one update's loss on two rollouts, on-policy (old = current).
    rows = [{"prompt_ids": p[0][:20], "completion_ids": p[0][20:], "old_logprobs": [0.0] * len(p[0][20:]),
             "advantage": a} for p, a in zip(_pairs()[:2], (1.0, -1.0), strict=True)]
    rb = {k: v.to(device) for k, v in collate_rollouts(rows, pad_id=0).items()}
    core = {k: rb[k] for k in ("input_ids", "position_ids", "labels")}
    logps = model(**core, output="token_logprobs")
    mask = rb["labels"] != -100
    res = grpo_loss(logps, logps.detach(), None, rb["advantages"], mask, kl_beta=0.0)
    res.loss.backward()
    out["grpo_loss"] = float(res.loss)
    out["grpo_grad_finite"] = all(torch.isfinite(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                                  .all().item() for p in model.parameters() if p.grad is not None)
    return out


def _recipe(tmp_path: Path, tiny_model: Path) -> Recipe:
    return load_recipe(write_recipe(tmp_path, name="cuda-paradigms", training={"max_steps": 1},
                                    compute={"workers": 1, "gpus_per_worker": 1}))


def test_dpo_kd_grpo_pieces_in_bf16_on_cuda_match_fp32_on_cpu(tmp_path: Path, tiny_model: Path) -> None:
    recipe = _recipe(tmp_path, tiny_model)
    (gpu,) = run_ranks(paradigm_outputs, 1, tmp_path / "gpu", recipe.model_dump_json(), "cuda", backend="nccl")
    cpu_recipe = recipe.model_copy(update={"compute": recipe.compute.model_copy(update={"gpus_per_worker": 0})})
    (cpu,) = run_ranks(paradigm_outputs, 1, tmp_path / "cpu", cpu_recipe.model_dump_json(), "cpu")
    assert gpu["dtype"] == "bfloat16" and cpu["dtype"] == "float32"
    # Sequence log-probs: sums of 9 to 12 tokens; bf16 weights move them by a few hundredths.
    torch.testing.assert_close(gpu["pairs"], cpu["pairs"], rtol=0.02, atol=0.3)
    assert float(cpu["kd"][0]) < 1e-6 and float(gpu["kd"][0]) < 0.05 * float(gpu["kd"][1])
    torch.testing.assert_close(gpu["kd"][1], cpu["kd"][1], rtol=0.02, atol=0.5)
    assert gpu["grpo_grad_finite"] and abs(gpu["grpo_loss"] - cpu["grpo_loss"]) < 0.05
