"""What a Ray job runs: `python -m posttrain.training_lib.entrypoint <stage> --workspace URI`.

The workspace holds `recipe.json` (written by the DAG's first task) and everything earlier
stages produced, so a stage needs nothing else. Never imports airflow.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from posttrain.recipe import Recipe
from posttrain.uris import local_path

STAGES = ("train", "evaluate")


def load_workspace(uri: str) -> tuple[Recipe, Path]:
    if not uri.startswith("file://") and "://" in uri:
        raise SystemExit(f"workspace {uri}: Ray jobs need a file:// workspace")
    workspace = local_path(uri)
    recipe_file = workspace / "recipe.json"
    if not recipe_file.exists():
        raise SystemExit(f"{recipe_file} is missing: run the DAG's resolve_recipe task first")
    return Recipe.model_validate(json.loads(recipe_file.read_text())), workspace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="posttrain.training_lib.entrypoint")
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--workspace", required=True, help="the run workspace URI (file://...)")
    args = parser.parse_args(argv)
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
