"""GRPO: the Ray job's driver is the single controller; the work is done by role actors.

- policy: `compute.workers` actors holding the FSDP2 policy (rl/policy.py), updated with the
  clipped-ratio objective and group-normalised advantages;
- rollout: `grpo.rollout_workers` vLLM engines (rl/rollout.py) sampling G completions per prompt;
- reward: an actor scoring completions with the recipe's reward functions (rl/rewards.py).

The loop, top to bottom: prompts of this step → completions (generated during the previous update
when `staleness: 1`) → rewards → advantages per group → one policy update over the dp ranks →
weight sync to the engines → log → maybe checkpoint (policy, optimizer and this controller's
state: step, prompt cursor, RNG). A resumed job restores all three and syncs the engines first,
so it samples exactly what the uninterrupted job would have.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean as _fmean
from statistics import pstdev as _pstdev
from typing import Any

from posttrain.recipe import Recipe


class RewardWorker:
    """Scores completions with the recipe's reward functions (user functions import here, once)."""

    def __init__(self, rewards: list[dict]):
        from posttrain.training_lib.rl.rewards import RewardSpec

        self.specs = [RewardSpec(r["name"], r["weight"], r["params"], r["label"]) for r in rewards]

    def score(self, completions: list[str], prompts: list[list[dict]], answers: list[str | None]) -> dict:
        from posttrain.training_lib.rl.rewards import score

        return score(self.specs, completions, prompts, answers)


class PromptCursor:
    """The prompts of each step: a shuffled pass over the data per epoch (seeded), resumable by position."""

    def __init__(self, count: int, seed: int, position: int = 0):
        self.count, self.seed, self.position = count, seed, position

    def take(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            epoch, offset = divmod(self.position, self.count)
            order = list(range(self.count))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            out.append(order[offset])
            self.position += 1
        return out


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


def start_roles(recipe: Recipe, workspace: Path, tokenizer: Any) -> Roles:
    """Policy actors (their own process group, rank 0's node as the rendezvous), rollout engines in
    the policy's precision, and the reward actor."""
    import ray
    from transformers import AutoConfig

    from posttrain.training_lib.data.loader import read_manifest
    from posttrain.training_lib.models.loading import model_dir
    from posttrain.training_lib.rl.policy import PolicyWorker
    from posttrain.training_lib.rl.rollout import RolloutEngine, stop_token_ids

    g, c = recipe.grpo, recipe.compute
    actor = ray.remote(num_cpus=c.cpus_per_worker, num_gpus=c.gpus_per_worker)(PolicyWorker)
    policy = [actor.remote() for _ in range(c.workers)]
    host, port = ray.get(policy[0].node_address.remote())
    infos = ray.get([p.init.remote(recipe.model_dump_json(), str(workspace), r, c.workers, f"{host}:{port}")
                     for r, p in enumerate(policy)])
    plan = infos[0]["plan"]
    base_dir = str(model_dir(recipe.model.base))
    engine = ray.remote(num_cpus=1, num_gpus=1 if c.gpus_per_worker else 0)(RolloutEngine)
    engines = [engine.remote(base_dir, plan["param_dtype"], recipe.data.max_seq_len + g.max_new_tokens,
                             len(tokenizer), stop_token_ids(tokenizer), recipe.training.seed)
               for _ in range(g.rollout_workers)]
    rewarder = ray.remote(num_cpus=0)(RewardWorker).remote([r.model_dump() for r in g.rewards])
    print(f"GRPO: plan {json.dumps(plan)}; {infos[0]['trainable']} trainable parameters on {c.workers} policy "
          f"workers, {g.rollout_workers} vLLM engines ({plan['param_dtype']}); {g.prompts_per_step} × "
          f"{g.group_size} completions per step, staleness {g.staleness}", flush=True)
    return Roles(policy, engines, rewarder, plan, AutoConfig.from_pretrained(base_dir).vocab_size,
                 read_manifest(workspace)["tokenizer"]["block_pad_id"])


def run(recipe: Recipe, workspace: Path) -> dict:
    import ray

    from posttrain.training_lib.data.loader import read_prompts
    from posttrain.training_lib.data.tokenizer import require_same_tokenizer
    from posttrain.training_lib.metrics import make_step_logger

    tokenizer = require_same_tokenizer(recipe.tokenizer_uri, workspace)
    g, t = recipe.grpo, recipe.training
    prompts = read_prompts(workspace, "train")
    ray.init(address="auto", log_to_driver=True)
    roles = start_roles(recipe, workspace, tokenizer)
    step, state = ray.get([p.resume.remote() for p in roles.policy])[0]
    cursor = PromptCursor(len(prompts), t.seed, (state or {"cursor": 0})["cursor"])
    max_steps = t.max_steps or t.epochs * max(1, len(prompts) // g.prompts_per_step)
    if step:  # the engines start from the base model: give them the restored policy first
        sync(roles, g.sync_bucket_mb, step)
        print(f"resumed from step {step} (prompt {cursor.position})", flush=True)
    logger = make_step_logger(recipe, workspace, 0, len(roles.policy), "cuda" if recipe.compute.gpus_per_worker
                              else "cpu", max_steps, roles.plan, start_step=step)

    def launch(at_step: int) -> tuple[list[int], list[Any]]:
        picked = cursor.take(g.prompts_per_step)
        share = -(-len(picked) // len(roles.engines))
        refs = [e.generate.remote([prompts[i]["ids"] for i in picked[k * share:(k + 1) * share]], g.group_size,
                                  g.temperature, g.max_new_tokens, t.seed * 1_000_003 + at_step * 1009)
                for k, e in enumerate(roles.engines)]
        return picked, refs

    pending = launch(step + 1) if step < max_steps else None
    while step < max_steps:
        step += 1
        lr = _learning_rate(recipe, step, max_steps)
        picked, refs = pending
        clock = {"wait": time.perf_counter()}
        rollouts = ray.get(refs)
        clock["wait"] = time.perf_counter() - clock["wait"]
        completions = [comp for r in rollouts for comp in r["completions"]]
        cursor_before_next = cursor.position
        if g.staleness and step < max_steps:  # generate the next batch while the policy updates on this one
            pending = launch(step + 1)
        rows, scores = build_rows(picked, completions, prompts, roles.rewarder, g)
        clock["update"] = time.perf_counter()
        result = update(roles, rows, lr, g.aggregation)
        clock["update"] = time.perf_counter() - clock["update"]
        clock["sync"] = time.perf_counter()
        sync(roles, g.sync_bucket_mb, step)
        clock["sync"] = time.perf_counter() - clock["sync"]
        extra = step_metrics(scores, rollouts, result, clock, step)
        if step == 1 or step == max_steps:  # the engine must now score as the policy does
            extra["sync/max_abs_logprob_diff"] = check_sync(roles, prompts[picked[0]]["ids"] + completions[0]["ids"])
        if not g.staleness and step < max_steps:
            pending = launch(step + 1)
        if step % t.log_every == 0 or step == max_steps:
            logger.log(step, result["loss"], lr, result["grad_norm"], sum(r["tokens"] for r in rollouts), extra=extra)
        if step % roles.plan["checkpoint_every"] == 0 or step == max_steps:
            # The cursor from before the next batch was taken: a resume takes it again (with staleness 1
            # it is then sampled by this step's policy, not the previous one). Sampling seeds come
            # from (seed, step), so the cursor is all the controller's RNG state there is.
            ray.get([p.save.remote(step, {"cursor": cursor_before_next}) for p in roles.policy])

    logger.close()
    return finish(roles, workspace, max_steps)


def update(roles: Roles, rows: list[dict], lr: float, aggregation: str) -> dict:
    """One policy step over the dp ranks (a tensor-parallel group shares its rows)."""
    import ray

    normalizer = sum(len(r["completion_ids"]) for r in rows) if aggregation == "token_mean" else len(rows)
    dp, tp = roles.plan["data_parallel"], roles.plan["tensor_parallel"]
    shards = [rows[k::dp] for k in range(dp)]
    # Every rank must run as many forwards as the others (FSDP's collectives): even the shards out
    # with rows that have no completion tokens (they add nothing to the loss).
    empty = {"prompt_ids": [roles.pad_id], "completion_ids": [], "old_logprobs": [], "advantage": 0.0}
    for shard in shards:
        shard += [empty] * (len(shards[0]) - len(shard))
    return ray.get([p.update.remote(shards[r // tp], lr, float(max(normalizer, 1)), roles.pad_id)
                    for r, p in enumerate(roles.policy)])[0]


def step_metrics(scores: dict, rollouts: list[dict], result: dict, clock: dict, step: int) -> dict:
    gen_s = max(r["seconds"] for r in rollouts)
    tokens = sum(r["tokens"] for r in rollouts)
    completions = sum(len(r["completions"]) for r in rollouts)
    per_reward = {k: v for k, v in scores.items() if k != "total"}
    return {"reward/mean": _fmean(scores["total"]), "reward/std": _pstdev(scores["total"]),
            **{f"reward/{k}": _fmean(v) for k, v in per_reward.items()},
            **{f"reward/{k}_std": _pstdev(v) for k, v in per_reward.items()},
            "kl": result["kl"], "clip_fraction": result["clip_fraction"],
            "rollout_tokens_per_s": tokens / gen_s if gen_s else 0.0, "rollout_s": gen_s,
            "rollout_wait_s": clock["wait"], "update_s": clock["update"], "sync_s": clock["sync"],
            "completion_len": tokens / max(completions, 1),
            "stale": float(rollouts[0]["version"] < step - 1)}  # sampled by an older policy than the last


def finish(roles: Roles, workspace: Path, max_steps: int) -> dict:
    """Export the policy (rank 0 writes model/ and adapter/), leave the process group, write the summary."""
    import ray

    from posttrain.training_lib.metrics import read_metrics, summarize_rows

    model_dir_out = ray.get([p.export.remote() for p in roles.policy])[0]
    ray.get([p.close.remote() for p in roles.policy])
    logged = read_metrics(workspace / "train" / "metrics.jsonl")
    summary = {"steps": max_steps, **summarize_rows(logged), "model_dir": model_dir_out, "plan": roles.plan}
    if logged:
        summary.update(reward_first=logged[0]["reward/mean"], reward_last=logged[-1]["reward/mean"])
    (workspace / "train" / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def build_rows(picked: list[int], completions: list[dict], prompts: list[dict], rewarder: Any,
               g: Any) -> tuple[list[dict], dict]:
    """Score the completions (G per prompt, in order) and turn them into update rows."""
    import ray
    import torch

    from posttrain.training_lib.losses.grpo import group_advantages

    owners = [prompts[i] for i in picked for _ in range(g.group_size)]
    scores = ray.get(rewarder.score.remote([c["text"] for c in completions], [o["messages"] for o in owners],
                                           [o["answer"] for o in owners]))
    advantages = group_advantages(torch.tensor(scores["total"], dtype=torch.float64), g.group_size,
                                  normalize_std=g.normalize_advantages)
    rows = [{"prompt_ids": o["ids"], "completion_ids": c["ids"], "old_logprobs": c["logprobs"],
             "advantage": float(a)}
            for o, c, a in zip(owners, completions, advantages.tolist(), strict=True) if c["ids"]]
    return rows, scores


# How far the engine's log-probs may be from the policy's after a sync: both compute in the same
# precision, so only the kernels differ.
SYNC_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1}


def check_sync(roles: Roles, ids: list[int]) -> float:
    """After a sync the engine must score a completion as the policy does: the largest difference
    of per-token log-probs of `ids` (a prompt and a completion of this step); over the tolerance the
    job fails (a precision or weight-layout mismatch would otherwise train on wrong ratios silently)."""
    import ray

    want = ray.get([p.sequence_logprobs.remote(ids) for p in roles.policy])[0]
    got = ray.get(roles.engines[0].prompt_logprobs.remote(ids))
    diff = max(abs(a - b) for a, b in zip(got, want, strict=True))
    if diff > SYNC_TOLERANCE[roles.dtype]:
        raise RuntimeError(f"after the weight sync the rollout engine's log-probs differ from the policy's by "
                           f"{diff:.3g} (> {SYNC_TOLERANCE[roles.dtype]} for {roles.dtype}): the engine is not "
                           "running the policy")
    return diff


def sync(roles: Roles, bucket_mb: int, version: int) -> None:
    """The policy's weights (after step `version`) into every engine: adapters only with LoRA, else
    the full weights in buckets."""
    import ray

    payload = ray.get([p.weights.remote(bucket_mb, roles.engine_vocab) for p in roles.policy])[0]
    if "adapter" in payload:
        ray.get([e.load_adapter.remote(payload["adapter"], payload["scaling"], payload["full_names"], version)
                 for e in roles.engines])
    else:
        ray.get([e.load_full.remote(payload["buckets"], version) for e in roles.engines])


def _learning_rate(recipe: Recipe, step: int, max_steps: int) -> float:
    from posttrain.training_lib.schedule import learning_rate

    t = recipe.training
    return learning_rate(step, t.learning_rate, max_steps, t.warmup_steps, t.lr_schedule)
