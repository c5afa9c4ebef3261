"""The built-in Great Expectations suites (chat, preference, prompt), run in an ephemeral context.

Each rule is one expectation with a name a user can read in the report; failures carry the
offending line numbers of the source file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from posttrain.recipe import DataValidationConfig
from posttrain.validation.frames import Frames


@dataclass
class RuleResult:
    rule: str
    table: str
    success: bool
    unexpected_count: int
    example_lines: list[int]


def _is_true(e: Any, column: str) -> Any:
    return e.ExpectColumnValuesToBeInSet(column=column, value_set=[True])


def suite_rules(data_format: str, rules: DataValidationConfig, min_rows: int) -> list[tuple[str, str, Any]]:
    """(rule as the report names it, table, expectation) for a data format."""
    import great_expectations as gx

    e = gx.expectations
    common = [
        ("at least min_rows examples", "rows", e.ExpectTableRowCountToBeBetween(min_value=min_rows)),
        ("duplicate examples within max_duplicate_fraction", "rows",
         e.ExpectColumnProportionOfUniqueValuesToBeBetween(column="fingerprint",
                                                           min_value=1.0 - rules.max_duplicate_fraction)),
        ("turns alternate user/assistant after an optional system prompt", "rows", _is_true(e, "role_order_ok")),
        (f"roles are {', '.join(rules.allowed_roles)}", "turns",
         e.ExpectColumnValuesToBeInSet(column="role", value_set=list(rules.allowed_roles))),
        ("content is a string", "turns", _is_true(e, "content_is_str")),
        ("content is not empty", "turns", e.ExpectColumnValuesToBeInSet(column="content_blank", value_set=[False])),
    ]
    prompt = [("prompt is a non-empty list of messages", "rows", _is_true(e, "prompt_is_list")),
              ("prompt ends with the user", "rows", _is_true(e, "prompt_ends_with_user"))]
    specific = {
        "chat": [("messages is a non-empty list", "rows", _is_true(e, "messages_is_list")),
                 ("last turn is from the assistant", "rows",
                  e.ExpectColumnValuesToBeInSet(column="last_role", value_set=["assistant"]))],
        "preference": prompt + [
            ("chosen is a non-empty list of assistant messages", "rows", _is_true(e, "chosen_is_assistant")),
            ("rejected is a non-empty list of assistant messages", "rows", _is_true(e, "rejected_is_assistant")),
            ("chosen differs from rejected", "rows", _is_true(e, "chosen_differs"))],
        "prompt": prompt + [("answer, when present, is a string", "rows", _is_true(e, "answer_ok"))],
    }
    return common[:1] + specific[data_format] + common[1:]


def run_suite(frames: Frames, data_format: str, rules_config: DataValidationConfig, min_rows: int,
              name: str) -> list[RuleResult]:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas(f"{name}-source")
    results = []
    tables = {"rows": frames.rows, "turns": frames.turns}
    batches = {t: source.add_dataframe_asset(t).add_batch_definition_whole_dataframe(t) for t in tables}
    suites = {t: context.suites.add(gx.ExpectationSuite(name=f"{name}-{t}")) for t in tables}
    rules = suite_rules(data_format, rules_config, min_rows)
    for _rule, table, expectation in rules:
        suites[table].add_expectation(expectation)
    for table, df in tables.items():
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{name}-{table}", data=batches[table], suite=suites[table]))
        outcome = definition.run(
            batch_parameters={"dataframe": df},
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["line"]})
        by_type = {}
        for r in outcome.results:
            by_type.setdefault((r.expectation_config.type, r.expectation_config.kwargs.get("column")), r)
        for rule, rule_table, expectation in rules:
            if rule_table != table:
                continue
            r = by_type[(expectation.expectation_type, getattr(expectation, "column", None))]
            index_list = r.result.get("unexpected_index_list") or []
            lines = sorted({int(row["line"]) for row in index_list if isinstance(row, dict) and "line" in row})
            if getattr(expectation, "column", None) == "fingerprint":
                # Uniqueness is a table-level figure; name the repeated rows for the report.
                df = tables[table]
                lines = sorted(int(x) for x in df.loc[df["fingerprint"].duplicated(), "line"])
            results.append(RuleResult(rule=rule, table=table, success=bool(r.success),
                                      unexpected_count=int(r.result.get("unexpected_count") or 0),
                                      example_lines=lines[:10]))
    return results
