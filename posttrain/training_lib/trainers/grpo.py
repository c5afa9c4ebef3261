"""GRPO: the Ray job's driver is the single controller; the work is done by role actors.

- policy: `compute.workers` actors holding the FSDP2 policy (rl/policy.py), updated with the
  clipped-ratio objective and group-normalised advantages;
- rollout: `grpo.rollout_workers` vLLM engines (rl/rollout.py) sampling G completions per prompt;
- reward: an actor scoring completions with the recipe's reward functions (rl/reward_worker.py).

The controller's steps (start the roles, score, update, sync, metrics, finish) are in
rl/controller.py. The loop, top to bottom: prompts of this step → completions (generated during
the previous update when `staleness: 1`) → rewards → advantages per group → one policy update over
the dp ranks (it sets the step's LR) → weight sync to the engines → log → maybe checkpoint
(policy, optimizer and this controller's state: step, prompt cursor, RNG). A resumed job restores
all three and syncs the engines first, so it samples exactly what the uninterrupted job would have.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from posttrain.prep.tokenizer import require_same_tokenizer
from posttrain.recipe import Recipe
from posttrain.storage_fs import Store
from posttrain.training_lib.data.loader import read_prompts
from posttrain.training_lib.metrics import make_step_logger
from posttrain.training_lib.rl.controller import (
    build_rows,
    check_sync,
    finish,
    on_policy,
    start_roles,
    step_metrics,
    sync,
    update,
)
from posttrain.training_lib.rl.prompts import PromptCursor
from posttrain.training_lib.runtime import checkpoint_due
from posttrain.training_lib.seeding import derive_seed


def run(recipe: Recipe, workspace: Store) -> dict:
    tokenizer = require_same_tokenizer(recipe.tokenizer_uri, workspace)
    g, t = recipe.grpo, recipe.training
    prompts = read_prompts(workspace, "train")
    ray.init(address="auto", log_to_driver=True)
    roles = start_roles(recipe, workspace, tokenizer)
    step, state = on_policy([p.resume.remote() for p in roles.policy])[0]
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
                                  g.temperature, g.max_new_tokens, derive_seed(t.seed, at_step * 1009))
                for k, e in enumerate(roles.engines)]
        return picked, refs

    pending = launch(step + 1) if step < max_steps else None
    while step < max_steps:
        step += 1
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
        result = update(roles, rows, step, max_steps, g.aggregation)
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
            logger.log(step, result["loss"], result["lr"], result["grad_norm"], sum(r["tokens"] for r in rollouts),
                       extra=extra)
        if checkpoint_due(step, max_steps, roles.plan["checkpoint_every"]):
            # The cursor from before the next batch was taken: a resume takes it again (with staleness 1
            # it is then sampled by this step's policy, not the previous one). Sampling seeds come
            # from (seed, step), so the cursor is all the controller's RNG state there is.
            on_policy([p.save.remote(step, {"cursor": cursor_before_next}) for p in roles.policy])
            logger.flush()  # the workspace holds the steps up to its newest checkpoint, at least

    return finish(roles, workspace, logger, max_steps)
