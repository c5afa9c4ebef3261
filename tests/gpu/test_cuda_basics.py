"""The same training pieces on CUDA. Skipped where no GPU is present (CI and these machines);
run on a GPU machine with `bash tests/gpu/run_on_device.sh`."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]


def test_packed_loss_matches_on_cuda(tiny_model) -> None:
    from transformers import AutoModelForCausalLM

    from posttrain.prep.packing import pack, shifted_labels
    from posttrain.training_lib.losses.cross_entropy import summed_cross_entropy
    from posttrain.training_lib.models.attention import packed_forward

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).cuda().eval()
    g = torch.Generator().manual_seed(0)
    docs = [(torch.randint(3, 400, (n,), generator=g).tolist(), [True] * n) for n in (40, 70, 25)]
    [block] = pack(docs, block_size=192, pad_id=0)
    batch = {k: torch.tensor([getattr(block, k)], device="cuda") for k in ("input_ids", "labels", "position_ids")}
    with torch.no_grad():
        packed = summed_cross_entropy(packed_forward(model, batch), batch["labels"]).item()
        alone = 0.0
        for ids, trains in docs:
            single = {"input_ids": torch.tensor([ids], device="cuda"),
                      "position_ids": torch.arange(len(ids), device="cuda")[None],
                      "labels": torch.tensor([shifted_labels(ids, trains)], device="cuda")}
            alone += summed_cross_entropy(packed_forward(model, single), single["labels"]).item()
    assert abs(packed - alone) / int((batch["labels"] != -100).sum()) < 1e-4
