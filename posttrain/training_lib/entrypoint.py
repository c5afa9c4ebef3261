"""What a Ray job runs: `python -m posttrain.training_lib.entrypoint <stage> --workspace URI`.

The workspace holds `recipe.json` (written by the DAG's first task) and everything earlier
stages produced, so a stage needs nothing else. It is a file:// folder or an s3:// prefix, and a job
reads and writes it there only: on an object store nothing of the run goes to the node's disk but
the models it loads or exports, in the node's model cache (posttrain/model_cache.py). Never imports
airflow.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from posttrain.recipe import Recipe
from posttrain.storage_fs import Store

STAGES = ("prepare", "train", "evaluate")


def workspace_recipe(uri: str) -> Recipe:
    try:
        recipe_file = Store.at(uri) / "recipe.json"
    except ValueError as exc:
        raise SystemExit(f"--workspace {uri}: {exc}") from None
    if not recipe_file.exists():
        raise SystemExit(f"{recipe_file} is missing: run the DAG's resolve_recipe task first")
    return Recipe.model_validate(recipe_file.read_json())


def load_workspace(uri: str) -> tuple[Recipe, Store]:
    """The recipe and the workspace `uri`."""
    return workspace_recipe(uri), Store.at(uri)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="posttrain.training_lib.entrypoint")
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--workspace", required=True, help="the run workspace URI (file://... or s3://...)")
    parser.add_argument("--chunk-bytes", type=int, default=None,
                        help="prepare: bytes of JSONL per tokenize task (default: about four per CPU of the cluster)")
    args = parser.parse_args(argv)
    if args.stage == "prepare":  # data.prepare: ray
        from posttrain.training_lib.data import ray_prepare

        result = ray_prepare.run(workspace_recipe(args.workspace), args.workspace, args.chunk_bytes)
        print(f"posttrain prepare finished: {json.dumps(result)}", flush=True)
        return 0
    recipe, workspace = load_workspace(args.workspace)
    # Dispatch: a stage imports only what it runs (here, not at the top); one trainer module per
    # paradigm (trainers/sft.py, trainers/dpo.py, …), each with run().
    if args.stage == "train":
        trainer = importlib.import_module(f"posttrain.training_lib.trainers.{recipe.paradigm}")
        result = trainer.run(recipe, workspace)
    else:
        from posttrain.training_lib.evaluation import run as evaluation

        result = evaluation.run(recipe, workspace)
    print(f"posttrain {args.stage} finished: {json.dumps(result)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
