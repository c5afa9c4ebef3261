"""The built-in Great Expectations suite for chat data, run in an ephemeral context.

Each rule is one expectation with a name a user can read in the report; failures carry the
offending line numbers of the source file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from posttrain.recipe import DataValidationConfig
from posttrain.validation.frames import ChatFrames


@dataclass
class RuleResult:
    rule: str
    table: str
    success: bool
    unexpected_count: int
    example_lines: list[int]


def _chat_rules(rules: DataValidationConfig, min_rows: int) -> list[tuple[str, str, Any]]:
    import great_expectations as gx

    e = gx.expectations
    return [
        ("at least min_rows conversations", "conversations",
         e.ExpectTableRowCountToBeBetween(min_value=min_rows)),
        ("messages is a non-empty list", "conversations",
         e.ExpectColumnValuesToBeInSet(column="messages_is_list", value_set=[True])),
        ("last turn is from the assistant", "conversations",
         e.ExpectColumnValuesToBeInSet(column="last_role", value_set=["assistant"])),
        ("turns alternate user/assistant after an optional system prompt", "conversations",
         e.ExpectColumnValuesToBeInSet(column="role_order_ok", value_set=[True])),
        ("duplicate conversations within max_duplicate_fraction", "conversations",
         e.ExpectColumnProportionOfUniqueValuesToBeBetween(column="fingerprint",
                                                           min_value=1.0 - rules.max_duplicate_fraction)),
        (f"roles are {', '.join(rules.allowed_roles)}", "turns",
         e.ExpectColumnValuesToBeInSet(column="role", value_set=list(rules.allowed_roles))),
        ("content is a string", "turns",
         e.ExpectColumnValuesToBeInSet(column="content_is_str", value_set=[True])),
        ("content is not empty", "turns",
         e.ExpectColumnValuesToBeInSet(column="content_blank", value_set=[False])),
    ]


def run_chat_suite(frames: ChatFrames, rules_config: DataValidationConfig, min_rows: int,
                   name: str) -> list[RuleResult]:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas(f"{name}-source")
    results = []
    tables = {"conversations": frames.conversations, "turns": frames.turns}
    batches = {t: source.add_dataframe_asset(t).add_batch_definition_whole_dataframe(t) for t in tables}
    suites = {t: context.suites.add(gx.ExpectationSuite(name=f"{name}-{t}")) for t in tables}
    rules = _chat_rules(rules_config, min_rows)
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
            if rule_table == "conversations" and getattr(expectation, "column", None) == "fingerprint":
                # Uniqueness is a table-level figure; name the repeated rows for the report.
                df = tables[table]
                lines = sorted(int(x) for x in df.loc[df["fingerprint"].duplicated(), "line"])
            results.append(RuleResult(rule=rule, table=table, success=bool(r.success),
                                      unexpected_count=int(r.result.get("unexpected_count") or 0),
                                      example_lines=lines[:10]))
    return results
