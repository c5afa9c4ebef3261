"""What GRPO's single controller (the Ray job's driver, trainers/grpo.py) does with its role actors:
start them, turn scored completions into update rows, run one policy step over the data-parallel
ranks, sync the weights to the rollout engines and check the sync, gather a step's metrics, and
finish (export and summary).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from statistics import fmean, pstdev
from typing import Any

import ray
import torch
from transformers import AutoConfig

from posttrain.recipe import GrpoConfig, Recipe
from posttrain.storage_fs import Store
from posttrain.training_lib.data.loader import read_manifest
from posttrain.training_lib.losses.grpo import group_advantages
from posttrain.training_lib.metrics import StepLogger, summarize_rows
from posttrain.training_lib.models.loading import model_dir
from posttrain.training_lib.models.vllm_engine import stop_token_ids
from posttrain.training_lib.rl.policy import PolicyWorker
from posttrain.training_lib.rl.reward_worker import RewardWorker
from posttrain.training_lib.rl.rollout import RolloutEngine

# How far the engine's log-probs may be from the policy's after a sync: both compute in the same
# precision, so only the kernels differ.
SYNC_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1}


@dataclass
class Roles:
    """The controller's actors and what it needs to know about them."""

    policy: list[Any]  # PolicyWorker actors, rank order
    engines: list[Any]  # RolloutEngine actors
    rewarder: Any  # RewardWorker actor
    plan: dict  # the policy's plan (as_dict)
    engine_vocab: int  # rows of the engines' embedding: the synced weights are cut to it
    pad_id: int

    @property
    def dtype(self) -> str:
        return self.plan["param_dtype"]


class PolicyActorDied(RuntimeError):
    pass


def on_policy(calls: list[Any]) -> list[Any]:
    """The results of one call per policy actor (object refs in rank order), as they come. The first
    actor that dies or raises fails the job at once, named: its peers would otherwise wait for it
    in their collectives until the process group times out. The job's checkpoints are complete or
    absent, so resubmitting it (an Airflow retry) resumes from the newest one."""
    rank_of = {ref: rank for rank, ref in enumerate(calls)}
    results: list[Any] = [None] * len(calls)
    pending = list(calls)
    while pending:
        [ready], pending = ray.wait(pending, num_returns=1)
        rank = rank_of[ready]
        try:
            results[rank] = ray.get(ready)
        except ray.exceptions.RayError as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise PolicyActorDied(
                f"GRPO policy actor rank {rank} of {len(calls)} failed ({type(exc).__name__}: {first}); "
                "stopping the job: resubmitting it resumes from the newest complete checkpoint") from exc
    return results


def start_roles(recipe: Recipe, workspace: Store, tokenizer: Any) -> Roles:
    """Policy actors (their own process group, rank 0's node as the rendezvous), rollout engines in
    the policy's precision, and the reward actor."""
    g, c = recipe.grpo, recipe.compute
    actor = ray.remote(num_cpus=c.cpus_per_worker, num_gpus=c.gpus_per_worker)(PolicyWorker)
    policy = [actor.remote() for _ in range(c.workers)]
    host, port = ray.get(policy[0].node_address.remote())
    infos = on_policy([p.init.remote(recipe.model_dump_json(), workspace.uri, r, c.workers,
                                     f"{host}:{port}")
                       for r, p in enumerate(policy)])
    plan = infos[0]["plan"]
    base_dir = str(model_dir(recipe.model.base))
    engine = ray.remote(num_cpus=1, num_gpus=1 if c.gpus_per_worker else 0)(RolloutEngine)
    # The URI, not this node's folder: an engine on another node resolves it there (s3://: its cache).
    engines = [engine.remote(recipe.model.base, plan["param_dtype"], recipe.data.max_seq_len + g.max_new_tokens,
                             len(tokenizer), stop_token_ids(tokenizer), recipe.training.seed)
               for _ in range(g.rollout_workers)]
    rewarder = ray.remote(num_cpus=0)(RewardWorker).remote([r.model_dump() for r in g.rewards])
    print(f"GRPO: plan {json.dumps(plan)}; {infos[0]['trainable']} trainable parameters on {c.workers} policy "
          f"workers, {g.rollout_workers} vLLM engines ({plan['param_dtype']}); {g.prompts_per_step} × "
          f"{g.group_size} completions per step, staleness {g.staleness}", flush=True)
    return Roles(policy, engines, rewarder, plan, AutoConfig.from_pretrained(base_dir).vocab_size,
                 read_manifest(workspace)["tokenizer"]["block_pad_id"])


def build_rows(picked: list[int], completions: list[dict], prompts: list[dict], rewarder: Any,
               g: GrpoConfig) -> tuple[list[dict], dict]:
    """Score the completions (G per prompt, in order) and turn them into update rows."""
    owners = [prompts[i] for i in picked for _ in range(g.group_size)]
    scores = ray.get(rewarder.score.remote([c["text"] for c in completions], [o["messages"] for o in owners],
                                           [o["answer"] for o in owners]))
    advantages = group_advantages(torch.tensor(scores["total"], dtype=torch.float64), g.group_size,
                                  normalize_std=g.normalize_advantages)
    rows = [{"prompt_ids": o["ids"], "completion_ids": c["ids"], "old_logprobs": c["logprobs"],
             "advantage": float(a)}
            for o, c, a in zip(owners, completions, advantages.tolist(), strict=True) if c["ids"]]
    return rows, scores


def update(roles: Roles, rows: list[dict], step: int, max_steps: int, aggregation: str) -> dict:
    """Optimizer step `step` of the policy over the dp ranks (a tensor-parallel group shares its
    rows); the policy sets the step's LR itself and reports it as "lr"."""
    normalizer = sum(len(r["completion_ids"]) for r in rows) if aggregation == "token_mean" else len(rows)
    dp, tp = roles.plan["data_parallel"], roles.plan["tensor_parallel"]
    shards = [rows[k::dp] for k in range(dp)]
    # Every rank must run as many forwards as the others (FSDP's collectives): even the shards out
    # with rows that have no completion tokens (they add nothing to the loss).
    empty = {"prompt_ids": [roles.pad_id], "completion_ids": [], "old_logprobs": [], "advantage": 0.0}
    for shard in shards:
        shard += [empty] * (len(shards[0]) - len(shard))
    return on_policy([p.update.remote(shards[r // tp], step, max_steps, float(max(normalizer, 1)), roles.pad_id)
                      for r, p in enumerate(roles.policy)])[0]


def sync(roles: Roles, bucket_mb: int, version: int) -> None:
    """The policy's weights (after step `version`) into every engine: adapters only with LoRA, else
    the full weights in buckets."""
    payload = on_policy([p.weights.remote(bucket_mb, roles.engine_vocab) for p in roles.policy])[0]
    if "adapter" in payload:
        ray.get([e.load_adapter.remote(payload["adapter"], payload["scaling"], payload["full_names"], version)
                 for e in roles.engines])
    else:
        ray.get([e.load_full.remote(payload["buckets"], version) for e in roles.engines])


def check_sync(roles: Roles, ids: list[int]) -> float:
    """After a sync the engine must score a completion as the policy does: the largest difference
    of per-token log-probs of `ids` (a prompt and a completion of this step); over the tolerance the
    job fails (a precision or weight-layout mismatch would otherwise train on wrong ratios silently)."""
    want = on_policy([p.sequence_logprobs.remote(ids) for p in roles.policy])[0]
    got = ray.get(roles.engines[0].prompt_logprobs.remote(ids))
    diff = max(abs(a - b) for a, b in zip(got, want, strict=True))
    if diff > SYNC_TOLERANCE[roles.dtype]:
        raise RuntimeError(f"after the weight sync the rollout engine's log-probs differ from the policy's by "
                           f"{diff:.3g} (> {SYNC_TOLERANCE[roles.dtype]} for {roles.dtype}): the engine is not "
                           "running the policy")
    return diff


def step_metrics(scores: dict, rollouts: list[dict], result: dict, clock: dict, step: int) -> dict:
    gen_s = max(r["seconds"] for r in rollouts)
    tokens = sum(r["tokens"] for r in rollouts)
    completions = sum(len(r["completions"]) for r in rollouts)
    per_reward = {k: v for k, v in scores.items() if k != "total"}
    return {"reward/mean": fmean(scores["total"]), "reward/std": pstdev(scores["total"]),
            **{f"reward/{k}": fmean(v) for k, v in per_reward.items()},
            **{f"reward/{k}_std": pstdev(v) for k, v in per_reward.items()},
            "kl": result["kl"], "clip_fraction": result["clip_fraction"],
            "rollout_tokens_per_s": tokens / gen_s if gen_s else 0.0, "rollout_s": gen_s,
            "rollout_wait_s": clock["wait"], "update_s": clock["update"], "sync_s": clock["sync"],
            "completion_len": tokens / max(completions, 1),
            "stale": float(rollouts[0]["version"] < step - 1)}  # sampled by an older policy than the last


def finish(roles: Roles, workspace: Store, logger: StepLogger, max_steps: int) -> dict:
    """Close the metrics, export the policy (rank 0 writes model/ and adapter/), leave the process
    group, write the summary (last: the driver's result)."""
    logger.close()
    model_uri = on_policy([p.export.remote() for p in roles.policy])[0]
    on_policy([p.close.remote() for p in roles.policy])
    summary = {"steps": max_steps, **summarize_rows(logger.rows), "model_dir": model_uri, "plan": roles.plan}
    if logger.rows:
        summary.update(reward_first=logger.rows[0]["reward/mean"], reward_last=logger.rows[-1]["reward/mean"])
    (workspace / "train" / "summary.json").write_json(summary)
    return summary
