"""The report as one HTML page: a header with the run and its decision, then the panels by section.
Styles are inline and nothing is fetched: the file opens the same from a disk, a bucket or an email."""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape

from posttrain.report.collect import RunData
from posttrain.report.panels import Panel

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #202124; background: #f8f9fa; }
header { background: #fff; border-bottom: 1px solid #dadce0; padding: 16px 28px; }
header h1 { font-size: 20px; margin: 0 0 6px; }
header p { margin: 2px 0; color: #5f6368; }
main { padding: 8px 28px 40px; }
h2 { font-size: 16px; margin: 24px 0 8px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 14px; }
section.panel { background: #fff; border: 1px solid #dadce0; border-radius: 8px; padding: 12px 14px; overflow-x: auto; }
section.panel.wide { grid-column: 1 / -1; }
section.panel h3 { font-size: 14px; margin: 0 0 8px; }
img { max-width: 100%; height: auto; display: block; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
th, td { border-bottom: 1px solid #e8eaed; padding: 4px 8px; text-align: left; vertical-align: top; }
td { max-width: 420px; white-space: pre-wrap; word-break: break-word; }
.empty { color: #5f6368; font-style: italic; }
.note { color: #5f6368; font-size: 12px; }
.none { color: #9aa0a6; }
.verdict { font-weight: 600; font-size: 15px; margin: 0; }
.good { color: #188038; } .bad { color: #d93025; }
ul.problems { color: #d93025; }
"""

WIDE = {"data-rows", "eval-metrics", "generations", "tasks"}


def render(run: RunData, sections: list[tuple[str, list[Panel]]]) -> str:
    recipe = run.recipe or {}
    name, paradigm = recipe.get("name", "?"), recipe.get("paradigm", "?")
    decision = run.decision if isinstance(run.decision, dict) else None
    verdict = (("promoted: " if decision.get("promoted") else "not promoted: ") + str(decision.get("reason", ""))
               if decision else "no promotion decision")
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>posttrain run report: {escape(name)}</title><style>{STYLE}</style></head><body>",
             f"<header><h1>Run report: {escape(name)} ({escape(paradigm)})</h1>",
             f"<p>Workspace: <code>{escape(run.workspace)}</code> · data validation: "
             f"<a href=\"validation/report.html\">validation/report.html</a></p>",
             f"<p id=\"verdict\">{escape(verdict)}</p>",
             f"<p>Written {datetime.now(UTC).strftime('%Y-%m-%d %H:%M:%S')} UTC</p></header><main>"]
    if run.problems:
        items = "".join(f"<li>{escape(p)}</li>" for p in run.problems)
        parts.append(f'<h2>Files that could not be read</h2><ul class="problems">{items}</ul>')
    for title, panels in sections:
        parts.append(f"<h2>{escape(title)}</h2><div class=\"grid\">")
        for panel in panels:
            wide = " wide" if panel.key in WIDE else ""
            parts.append(f'<section class="panel{wide}" id="{escape(panel.key)}" '
                         f'data-has-data="{str(panel.has_data).lower()}"><h3>{escape(panel.title)}</h3>'
                         f"{panel.body}</section>")
        parts.append("</div>")
    parts.append("</main></body></html>")
    return "".join(parts)
