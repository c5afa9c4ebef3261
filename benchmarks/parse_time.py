"""How long Airflow takes to parse a dags folder of 100 posttrain recipes, and what it imports.

Writes 100 recipe variants next to dags/posttrain_dags.py in a scratch folder under
$POSTTRAIN_HOME (default .posttrain/), parses it with DagBag in a fresh Python process and prints
one JSON object:
  {"recipes": 100, "dags_loaded": 100, "parse_seconds": ..., "heavy_modules_imported": [...], ...}
parse_seconds is the DagBag fill alone (Airflow's own import is reported apart as import_seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
HEAVY = ["torch", "ray", "transformers", "vllm", "peft", "great_expectations"]

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag
t1 = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
t2 = time.perf_counter()
print(json.dumps({"dags_loaded": len(bag.dag_ids), "import_errors": len(bag.import_errors),
                  "import_seconds": round(t1 - t0, 3), "parse_seconds": round(t2 - t1, 3),
                  "heavy_modules_imported": [m for m in sys.argv[2].split(",") if m in sys.modules]}))
"""


def write_folder(folder: Path, n: int) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "recipes").mkdir(parents=True)
    shutil.copy(REPO / "dags" / "posttrain_dags.py", folder)
    base = yaml.safe_load((REPO / "dags" / "recipes" / "tiny-sft.yaml").read_text())
    base["model"]["base"] = str(REPO / ".posttrain" / "models" / "tiny")
    base["data"]["train"] = str(REPO / "dags" / "data" / "tiny-chat" / "train.jsonl")
    base["data"]["eval"] = str(REPO / "dags" / "data" / "tiny-chat" / "eval.jsonl")
    base["storage"]["root"] = str(folder / "storage")
    schedules = [None, "@daily", "@weekly", "0 3 * * 1"]
    for i in range(n):
        recipe = json.loads(json.dumps(base))
        recipe["name"] = f"variant-{i:03d}"
        recipe["training"]["learning_rate"] = 1e-4 * (1 + i % 7)
        recipe["training"]["max_steps"] = 10 + i
        if i % 5 == 4:
            recipe["schedule"] = None
            recipe["trigger_on_assets"] = [f"s3://etl/chat/{i}"]
        else:
            recipe["schedule"] = schedules[i % 4]
        if i % 3 == 0:
            recipe["model"]["lora"] = {"rank": 8, "alpha": 16}
        (folder / "recipes" / f"variant-{i:03d}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes; the best is reported")
    args = parser.parse_args()
    home = Path(os.environ.get("POSTTRAIN_HOME") or REPO / ".posttrain")
    folder = home / "bench" / "parse_time" / "dags"
    write_folder(folder, args.recipes)
    env = {**os.environ, "AIRFLOW_HOME": str(home / "bench" / "parse_time" / "airflow"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, "-c", CHILD, str(folder), ",".join(HEAVY)], env=env,
                             capture_output=True, text=True, check=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["parse_seconds"])
    print(json.dumps({"recipes": args.recipes, "dags_loaded": best["dags_loaded"],
                      "parse_seconds": best["parse_seconds"],
                      "heavy_modules_imported": best["heavy_modules_imported"],
                      "import_errors": best["import_errors"], "airflow_import_seconds": best["import_seconds"],
                      "tasks_per_dag": 8, "parse_seconds_all_runs": [r["parse_seconds"] for r in runs]}))


if __name__ == "__main__":
    main()
