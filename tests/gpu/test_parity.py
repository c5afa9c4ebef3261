"""The CPU parity tests of the training core, on CUDA: sharded loading + logit verifier in bf16,
tensor parallel over 2 GPUs (when there are 2), compiled blocks, chunked cross-entropy memory and
NVML readings. Skipped without a GPU; run on one with `bash tests/gpu/run_on_device.sh`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain.recipe import Recipe, load_recipe
from tests.conftest import write_recipe
from tests.distributed import run_ranks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]
SEQ = 64


def cuda_logits(rank: int, world: int, recipe_json: str) -> dict:
    from posttrain.training_lib.models.verify import collective_logits, random_batch
    from posttrain.training_lib.parallel.parallelize import build_parallel_model, make_mesh
    from posttrain.training_lib.parallel.plan import make_plan

    recipe = Recipe.model_validate_json(recipe_json)
    plan = make_plan(recipe, world, "cuda")
    model, report = build_parallel_model(recipe, plan, make_mesh(plan, "cuda"))
    batch = random_batch(vocab=500, seq_len=SEQ)
    logits = collective_logits(model, batch, device="cuda")
    loss = model(**{k: v.cuda() for k, v in batch.items()})
    loss.backward()
    return {"logits": logits, "loss": float(loss), "plan": plan.as_dict(), "report": report.as_dict(),
            "peak_mb": torch.cuda.max_memory_allocated() / 2**20}


def _reference(recipe: Recipe) -> tuple[torch.Tensor, float]:
    from posttrain.training_lib.models.loading import load_for_training
    from posttrain.training_lib.models.verify import collective_logits, random_batch
    from posttrain.training_lib.models.with_loss import CausalLMWithLoss

    model = CausalLMWithLoss(load_for_training(recipe)).cuda()
    batch = random_batch(vocab=500, seq_len=SEQ)
    with torch.no_grad():
        loss = float(model(**{k: v.cuda() for k, v in batch.items()}))
    return collective_logits(model, batch, device="cuda"), loss


def _recipe(tmp_path: Path, workers: int = 1, **training) -> Recipe:  # noqa: ANN003
    return load_recipe(write_recipe(tmp_path, training={"max_steps": 4, **training},
                                    compute={"workers": workers, "gpus_per_worker": 1}))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sharded_model_matches_the_plain_model_on_cuda(tmp_path: Path, tiny_model: Path, precision: str) -> None:
    from posttrain.training_lib.models.verify import compare_logits

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    world = min(2, torch.cuda.device_count())
    recipe = _recipe(tmp_path, world, precision=precision)
    ranks = run_ranks(cuda_logits, world, tmp_path / "ranks", recipe.model_dump_json(), backend="nccl")
    want, _ = _reference(recipe)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for r in ranks:
        assert r["plan"]["param_dtype"] == ("bfloat16" if precision == "bf16" else "float32")
        compare_logits(r["logits"], want, dtype)
        assert r["report"]["local_bytes"] <= r["report"]["full_bytes"] / world + 4 * 512


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="tensor parallel needs 2 GPUs")
def test_tensor_parallel_on_two_gpus(tmp_path: Path, tiny_model: Path) -> None:
    from posttrain.training_lib.models.verify import compare_logits

    recipe = _recipe(tmp_path, 2, tensor_parallel=2, precision="fp32")
    ranks = run_ranks(cuda_logits, 2, tmp_path / "ranks", recipe.model_dump_json(), backend="nccl")
    want, loss = _reference(recipe)
    for r in ranks:
        compare_logits(r["logits"], want)
        assert r["loss"] == pytest.approx(loss, rel=1e-4)


def test_compiled_blocks_match_eager_on_cuda(tmp_path: Path, tiny_model: Path) -> None:
    from posttrain.training_lib.models.verify import compare_logits

    recipe = _recipe(tmp_path, 1, compile=True, activation_checkpointing=True, precision="fp32")
    (rank,) = run_ranks(cuda_logits, 1, tmp_path / "ranks", recipe.model_dump_json(), backend="nccl")
    want, loss = _reference(recipe)
    compare_logits(rank["logits"], want)
    assert rank["loss"] == pytest.approx(loss, rel=1e-4)


def test_chunked_cross_entropy_memory_and_parity_on_cuda() -> None:
    from posttrain.training_lib.losses.chunked import chunked_cross_entropy

    vocab, tokens, hidden = 32768, 4096, 1024
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(tokens, hidden, device="cuda", generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, device="cuda", generator=g) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (1, tokens), device="cuda", generator=g)
    labels[:, :256] = -100

    def peak(fn) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:  # noqa: ANN001
        h.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = fn()
        loss.backward()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, loss.detach(), h.grad.clone(), w.grad.clone()

    def naive() -> torch.Tensor:
        logits = (h @ w.t()).float()
        return torch.nn.functional.cross_entropy(logits, labels[0], ignore_index=-100, reduction="sum")

    naive_mb, naive_loss, naive_gh, naive_gw = peak(naive)
    chunk_mb, chunk_loss, chunk_gh, chunk_gw = peak(lambda: chunked_cross_entropy(h[None], w, labels, 512))
    torch.testing.assert_close(chunk_loss, naive_loss, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(chunk_gh, naive_gh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(chunk_gw, naive_gw, rtol=1e-4, atol=1e-5)
    assert chunk_mb < 0.25 * naive_mb, (chunk_mb, naive_mb)


def test_nvml_reports_this_gpu() -> None:
    pytest.importorskip("pynvml")
    from posttrain.training_lib.metrics import GpuStats

    torch.ones(1, device="cuda")
    stats = GpuStats().read()
    assert stats["gpu_mem_used_mb"] > 0 and 0 <= stats["gpu_util_pct"] <= 100
