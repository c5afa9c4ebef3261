"""validate_data: the recipe's data files against the built-in Great Expectations suite."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from airflow.sdk.exceptions import AirflowException

from posttrain.operators.base import PosttrainOperator


class DataValidationError(AirflowException):
    pass


class ValidateDataOperator(PosttrainOperator):
    def lineage(self, recipe: Any) -> tuple[list[str], list[str]]:
        return [recipe.data.train, recipe.data.eval], [f"{self.workspace}/validation/report.json"]

    def _lines(self, uri: str) -> Iterator[bytes]:
        with self.storage.path(uri).open("rb") as fh:  # streamed, never read whole
            yield from fh

    def execute(self, context: Any) -> dict[str, Any]:
        from posttrain.validation.report import summary, to_html
        from posttrain.validation.run import validate_recipe_data

        recipe = self.load_recipe()
        report = validate_recipe_data(recipe, self._lines)
        self.storage.write_json_atomic(f"{self.workspace}/validation/report.json", report)
        self.storage.path(f"{self.workspace}/validation/report.html").write_text(to_html(report))
        counts = {split: {"rows": r["rows"], "passed": r["passed"], "failed": r["failed"]}
                  for split, r in report["splits"].items()}
        if not report["success"]:
            raise DataValidationError("data validation failed:\n" + summary(report)
                                      + f"\nreport: {self.workspace}/validation/report.html")
        self.log.info("data validation passed: %s", counts)
        return counts
