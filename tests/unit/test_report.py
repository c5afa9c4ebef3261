"""The run report built from a synthetic workspace (tests/report_workspace.py): every panel there,
every plot a PNG data URI, the numbers from the workspace's files, and panels without data saying
so instead of failing."""

from __future__ import annotations

import base64
import math
from html.parser import HTMLParser
from pathlib import Path

import pytest

from posttrain.report.build import build_report, write_report
from tests.report_workspace import EVAL_ROWS, TASKS, write_workspace

COMMON = ["train-loss", "train-lr", "train-grad-norm", "train-tokens-per-s", "train-mfu", "data-lengths", "data-fill",
          "data-rows", "eval-metrics", "eval-comparison", "generations", "tasks"]
PARADIGM_PANELS = {"sft": ["paradigm-sft"], "kd": ["kd-divergence"], "dpo": ["dpo-rewards", "dpo-accuracy"],
                   "grpo": ["grpo-rewards", "grpo-completion-length", "grpo-kl"]}
PNG = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """The report's panels (id → has data) and each panel's image sources."""

    def __init__(self, html: str):
        super().__init__()
        self.panels: dict[str, bool] = {}
        self.images: dict[str, list[str]] = {}
        self.current: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section":
            self.current = a["id"]
            self.panels[self.current] = a["data-has-data"] == "true"
        if tag == "img" and self.current:
            self.images.setdefault(self.current, []).append(a["src"] or "")


def is_png_data_uri(src: str) -> bool:
    head, _, data = src.partition(",")
    return head == "data:image/png;base64" and base64.b64decode(data).startswith(PNG)


@pytest.mark.parametrize("paradigm", ["sft", "kd", "dpo", "grpo"])
def test_every_panel_is_there_with_its_plots(tmp_path: Path, paradigm: str) -> None:
    ws = write_workspace(str(tmp_path / "storage"), paradigm)
    uri, report = write_report(ws, TASKS)
    assert uri == f"{ws}/report.html" and Path(uri).read_text() == report.html
    page = Page(report.html)
    expected = COMMON[:5] + PARADIGM_PANELS[paradigm] + COMMON[5:]
    assert list(page.panels) == expected
    packed = paradigm in ("sft", "kd")
    without = {"data-fill"} if not packed else set()
    without |= {"generations"} if paradigm == "dpo" else set()  # DPO evaluation generates nothing
    assert {k for k, has in page.panels.items() if not has} == without
    assert report.run.problems == []
    plotted = {k for k, srcs in page.images.items() if srcs}
    assert plotted == {k for k in expected if page.panels[k]} - {"paradigm-sft", "data-rows", "eval-metrics",
                                                                 "generations"}
    assert all(is_png_data_uri(src) for srcs in page.images.values() for src in srcs)
    assert "http://" not in report.html and "https://" not in report.html  # nothing to fetch
    # A resumed job logged step 3 twice: the later record counts.
    assert [r["step"] for r in report.run.steps] == list(range(1, 9)) and report.run.steps[2]["loss"] == math.pi


def test_numbers_come_from_the_workspace(tmp_path: Path) -> None:
    ws = write_workspace(str(tmp_path / "storage"), "sft")
    report = build_report(ws, TASKS)
    run = report.run
    # The champion's eval_loss over the 12 paired examples: Σ(30.5 + i) / Σ 10 tokens.
    panel = next(p for p in report.panels if p.key == "eval-metrics")
    assert "<td>3.6</td>" in panel.body and "champion first" in panel.body
    assert run.lengths["train"].series["documents"][:3] == [8, 15, 22] and run.lengths["train"].fills
    # Side by side: the 8 examples both generated, with the eval file's prompt and reference.
    assert [e.example_id.split("-")[0] for e in run.examples] == [str(i) for i in range(1, 9)]
    first = run.examples[0]
    assert (first.prompt, first.reference) == ("What is 0 plus 0?", "0 plus 0 is 0.")
    assert (first.champion, first.challenger) == ("champion answer 0", "challenger answer 0")
    decision = next(p for p in report.panels if p.key == "eval-comparison").body
    assert "promoted" in decision and "<td>-0.05</td>" in decision
    tasks = next(p for p in report.panels if p.key == "tasks").body
    assert "not finished" in tasks and "Finished tasks: 43.9 s" in tasks


def test_grpo_prompts_come_from_the_samples(tmp_path: Path) -> None:
    run = build_report(write_workspace(str(tmp_path / "storage"), "grpo"), TASKS).run
    assert len(run.examples) == 10 < EVAL_ROWS
    assert (run.examples[0].prompt, run.examples[0].reference) == ("prompt 0", "answer 0")
    assert run.examples[0].champion == "champion says 0"


def test_first_run_has_no_champion_column_values(tmp_path: Path) -> None:
    report = build_report(write_workspace(str(tmp_path / "storage"), "sft", champion=False), TASKS)
    assert report.run.champion is None and all(e.champion is None for e in report.run.examples)
    assert len(report.run.examples) == 8
    body = next(p for p in report.panels if p.key == "generations").body
    assert "No champion yet" in body
    assert "there was no champion to pair with" in next(p for p in report.panels if p.key == "eval-comparison").body


def test_a_run_that_stopped_early_still_gets_every_panel(tmp_path: Path) -> None:
    """Only recipe.json: a run whose validation failed. Every panel is there and says what is missing."""
    ws = write_workspace(str(tmp_path / "storage"), "dpo")
    for name in ("train", "data", "eval", "promotion"):
        for f in sorted((Path(ws) / name).rglob("*"), reverse=True):
            f.unlink() if f.is_file() else f.rmdir()
    report = build_report(ws, [])
    page = Page(report.html)
    assert list(page.panels) == COMMON[:5] + PARADIGM_PANELS["dpo"] + COMMON[5:]
    assert not any(page.panels.values()) and not page.images
    assert report.html.count("No data:") == len(page.panels)
    assert "data/manifest.json was not written" in report.html and "decision.json was not written" in report.html
    assert report.run.problems == []


def test_unreadable_files_are_named_and_the_rest_still_reported(tmp_path: Path) -> None:
    ws = write_workspace(str(tmp_path / "storage"), "sft")
    metrics = Path(ws) / "train" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:2] + ['{"step": 3, "loss":'] + lines[2:]) + "\n")
    (Path(ws) / "eval" / "per_example.parquet").write_bytes(b"not parquet")
    (Path(ws) / "promotion" / "decision.json").write_text("{")
    report = build_report(ws, TASKS)
    problems = report.run.problems
    assert f"{ws}/train/metrics.jsonl line 3: not valid JSON" in problems[0]
    assert any(p.startswith(f"{ws}/eval/per_example.parquet: ") for p in problems)
    assert any(p.startswith(f"{ws}/promotion/decision.json: ") for p in problems)
    page = Page(report.html)
    assert page.panels["train-loss"] and not page.panels["eval-comparison"] and not page.panels["generations"]
    assert "Files that could not be read" in report.html
