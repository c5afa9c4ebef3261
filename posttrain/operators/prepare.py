"""prepare_data: tokenize with the model's chat template, mask to assistant tokens, pack.

`data.prepare: local` runs it here, in the Airflow task; `ray` submits it as a Ray job on the run's
cluster (posttrain.training_lib.data.ray_prepare: Ray Data, same output), which the DAG starts
before this task. Either way the workspace ends up with the same `data/` and the same XCom.
"""

from __future__ import annotations

from typing import Any

from posttrain.operators.base import PosttrainOperator
from posttrain.operators.ray_job import RayJobOperator
from posttrain.prep.prepare import prepare

STAT_KEYS = ("rows", "tokens", "blocks", "pairs", "prompts", "fill_ratio", "truncated", "dropped_overlong")


def prepared(operator: PosttrainOperator, manifest: dict[str, Any]) -> dict[str, Any]:
    """The task's XCom: where the manifest is and the splits' counts."""
    stats = {split: {k: s[k] for k in STAT_KEYS if k in s} for split, s in manifest["splits"].items()}
    operator.log.info("prepared: %s", stats)
    return {"manifest": f"{operator.workspace}/data/manifest.json", "splits": stats,
            "tokenizer_fingerprint": manifest["tokenizer"]["fingerprint"]}


class PrepareDataOperator(PosttrainOperator):
    def lineage(self, recipe: Any) -> tuple[list[str], list[str]]:
        return [recipe.data.train, recipe.data.eval, recipe.tokenizer_uri], [f"{self.workspace}/data"]

    def execute(self, context: Any) -> dict[str, Any]:
        # Straight to the workspace, a local folder or an object store (through the storage connection).
        manifest = prepare(self.load_recipe(), self.storage.store(self.workspace),
                           open_binary=lambda uri: self.storage.path(uri).open("rb"),
                           models=lambda uri: self.storage.path(uri).fs)  # an s3:// tokenizer or teacher
        return prepared(self, manifest)


class RayPrepareDataOperator(RayJobOperator):
    """`data.prepare: ray`: the prepare job on the run's cluster; the manifest it wrote is the result."""

    stage = "prepare"
    ui_color = "#e6f4ea"

    def lineage(self, recipe: Any) -> tuple[list[str], list[str]]:
        return [recipe.data.train, recipe.data.eval, recipe.tokenizer_uri], [f"{self.workspace}/data"]

    def result(self, context: Any) -> dict[str, Any]:
        return prepared(self, self.storage.read_json(f"{self.workspace}/data/manifest.json"))
