"""prepare_data: tokenize with the model's chat template, mask to assistant tokens, pack."""

from __future__ import annotations

from typing import Any

from posttrain.operators.base import PosttrainOperator
from posttrain.prep.prepare import prepare


class PrepareDataOperator(PosttrainOperator):
    def lineage(self, recipe: Any) -> tuple[list[str], list[str]]:
        return [recipe.data.train, recipe.data.eval, recipe.tokenizer_uri], [f"{self.workspace}/data"]

    def execute(self, context: Any) -> dict[str, Any]:
        # Straight to the workspace, a local folder or an object store (through the storage connection).
        manifest = prepare(self.load_recipe(), self.storage.store(self.workspace),
                           open_binary=lambda uri: self.storage.path(uri).open("rb"))
        keys = ("rows", "tokens", "blocks", "pairs", "prompts", "fill_ratio", "truncated", "dropped_overlong")
        stats = {split: {k: s[k] for k in keys if k in s} for split, s in manifest["splits"].items()}
        self.log.info("prepared: %s", stats)
        return {"manifest": f"{self.workspace}/data/manifest.json", "splits": stats,
                "tokenizer_fingerprint": manifest["tokenizer"]["fingerprint"]}
