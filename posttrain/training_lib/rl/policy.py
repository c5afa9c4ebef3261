"""The policy role: one of `compute.workers` Ray actors that together hold the FSDP2 (and TP)
policy, update it with the GRPO objective on their share of a rollout batch, checkpoint it with the
controller's state, hand its weights to the rollout engines, and export it at the end.

The actors form their own torch process group (the controller tells them rank 0's address), so the
controller can drive them step by step, which Ray Train's run-to-completion loop does not allow.
The place in the job, model, sharded load, optimizer, LR, checkpoints and export are runtime.py's,
as every trainer's.
"""

from __future__ import annotations

import socket

import ray
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from posttrain.prep.packing import IGNORE
from posttrain.recipe import Recipe
from posttrain.storage_fs import Store
from posttrain.training_lib import runtime
from posttrain.training_lib.grad_clip import clip_grad_norm
from posttrain.training_lib.losses.grpo import grpo_loss
from posttrain.training_lib.models.sharded_load import checkpoint_name
from posttrain.training_lib.parallel.parallelize import build_frozen_model


def collate_rollouts(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One row per completion: prompt + completion, right-padded. `labels` hold the completion
    tokens (shifted: position i predicts token i + 1), `old_logprobs` the sampling policy's log-prob
    of the same tokens at the same positions, `advantages` one value per row."""
    width = max(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    old = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, r in enumerate(rows):
        p, c = len(r["prompt_ids"]), len(r["completion_ids"])
        ids[i, :p + c] = torch.tensor(r["prompt_ids"] + r["completion_ids"])
        labels[i, p - 1:p + c - 1] = torch.tensor(r["completion_ids"])
        old[i, p - 1:p + c - 1] = torch.tensor(r["old_logprobs"])
    return {"input_ids": ids, "position_ids": torch.arange(width).expand(len(rows), -1).contiguous(),
            "labels": labels, "old_logprobs": old, "advantages": torch.tensor([r["advantage"] for r in rows])}


class PolicyWorker:
    """Created with `ray.remote(...)` by the controller; `init` joins the process group."""

    def node_address(self) -> tuple[str, int]:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init(self, recipe_json: str, workspace: str, rank: int, world: int, master: str) -> dict:
        recipe = Recipe.model_validate_json(recipe_json)
        device = runtime.choose_device(recipe)
        if device == "cuda":
            torch.cuda.set_device(0)  # Ray gives each actor its own GPU as device 0
        dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://{master}",
                                rank=rank, world_size=world)
        self.w = runtime.make_worker(recipe, Store.at(workspace), rank, world, device)
        self.model, self.trainable, self.optimizer, report = runtime.build_model(self.w)
        g = recipe.grpo
        # The KL term's reference: with LoRA the base with the adapters off, else a frozen copy.
        self.reference = None
        if g.kl_beta > 0 and recipe.model.lora is None:
            self.reference, _ = build_frozen_model(recipe, self.w.plan, self.w.mesh, recipe.model.base)
        # Eval mode throughout: LoRA dropout would make the policy's log-probs differ from the ones
        # the engine sampled with, and the ratio would measure the dropout noise, not the update.
        self.model.eval()
        return {"plan": self.w.plan.as_dict(), "trainable": sum(p.numel() for p in self.trainable),
                "bytes_read": report.bytes_read, "full_bytes": report.full_bytes}

    def resume(self) -> tuple[int, dict | None]:
        """(step, controller state) of the newest complete checkpoint, restored; (0, None) without one."""
        return runtime.resume(self.w, self.model, self.optimizer)

    def update(self, rows: list[dict], step: int, max_steps: int, normalizer: float, pad_id: int) -> dict:
        """Optimizer step `step` (of `max_steps`, for the LR schedule) on this rank's rows.
        `normalizer`: the step's global count of completion tokens (token_mean) or completions
        (sequence_mean)."""
        w, g = self.w, self.w.recipe.grpo
        lr = runtime.set_learning_rate(w, self.optimizer, step, max_steps)
        sums = torch.zeros(4, dtype=torch.float64)  # loss, clipped tokens, kl · tokens, tokens
        mbs = w.t.micro_batch_size
        for start in range(0, len(rows), mbs):
            batch = {k: v.to(w.device) for k, v in collate_rollouts(rows[start:start + mbs], pad_id).items()}
            core = {k: batch[k] for k in ("input_ids", "position_ids", "labels")}
            mask = batch["labels"] != IGNORE
            logps = self.model(**core, output="token_logprobs")
            ref = self._reference_logprobs(core) if g.kl_beta > 0 else None
            out = grpo_loss(logps, batch["old_logprobs"], ref, batch["advantages"], mask, clip_eps=g.clip_eps,
                            kl_beta=g.kl_beta, aggregation=g.aggregation, clip_eps_high=g.clip_eps_high,
                            normalizer=normalizer)
            # The loss is this rank's part of the global mean; FSDP averages gradients over dp ranks.
            (out.loss * w.dp_size).backward()
            tokens = float(mask.sum())
            sums += torch.tensor([float(out.loss), float(out.clip_fraction) * tokens,
                                  float(out.kl or 0.0) * tokens, tokens], dtype=torch.float64)
        grad_norm = clip_grad_norm(self.trainable, w.t.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(sums, group=w.dp_group)
        return {"loss": float(sums[0]), "lr": lr, "clip_fraction": float(sums[1] / sums[3].clamp(min=1)),
                "kl": float(sums[2] / sums[3].clamp(min=1)), "grad_norm": grad_norm}

    def _reference_logprobs(self, core: dict) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is not None:
                return self.reference(**core, output="token_logprobs")
            with self.model.lm.disable_adapter():
                return self.model(**core, output="token_logprobs")

    def sequence_logprobs(self, ids: list[int]) -> list[float]:
        """Collective: log p(ids[i] | ids[:i]) for i ≥ 1 under the current policy (the sync check)."""
        row = {"input_ids": torch.tensor([ids]), "position_ids": torch.arange(len(ids))[None],
               "labels": torch.tensor([ids[1:] + [IGNORE]])}
        with torch.no_grad():
            logps = self.model(**{k: v.to(self.w.device) for k, v in row.items()}, output="token_logprobs")
        return logps[0, :-1].tolist()

    def save(self, step: int, controller_state: dict) -> None:
        runtime.save(self.w, step, self.model, self.optimizer, controller_state)

    def weights(self, bucket_mb: int, vocab: int) -> dict | None:
        """Collective. Rank 0 returns what the rollout engines load: with LoRA {"adapter": {base
        weight name: (A, B)}, "scaling", "full_names"}; otherwise {"buckets": [object refs]}, the full
        weights in checkpoint names, rows past the engine's `vocab` dropped, each bucket ≤ bucket_mb."""
        lora = self.w.recipe.model.lora
        rank0 = self.w.rank == 0
        names, adapter, buckets, bucket, size = [], {}, [], [], 0
        for name, param in self.model.named_parameters():
            if lora is not None and "lora_" not in name:
                if rank0 and name.endswith(".weight"):
                    names.append(checkpoint_name(name))
                continue
            full = param.full_tensor() if isinstance(param, DTensor) else param  # collective on every rank
            if not rank0:
                continue
            tensor = full.detach().to("cpu", copy=True)
            if lora is not None:  # "...q_proj.lora_A.default.weight" → A of "...q_proj.weight"
                base = checkpoint_name(name.split(".lora_")[0] + ".weight")
                pair = adapter.setdefault(base, [None, None])
                pair[0 if ".lora_A." in name else 1] = tensor
                continue
            key = checkpoint_name(name)
            if key.endswith(("embed_tokens.weight", "lm_head.weight")):
                tensor = tensor[:vocab]
            bucket.append((key, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= bucket_mb * 2**20:
                buckets.append(ray.put(bucket))
                bucket, size = [], 0
        if not rank0:
            return None
        if lora is not None:
            return {"adapter": {k: tuple(v) for k, v in adapter.items()}, "scaling": lora.alpha / lora.rank,
                    "full_names": names}
        if bucket:
            buckets.append(ray.put(bucket))
        return {"buckets": buckets}

    def export(self) -> str | None:
        """Collective: the export's URI on rank 0."""
        return runtime.export_model(self.w, self.model)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

