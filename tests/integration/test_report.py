"""The run report on real components: built from a workspace on moto's S3 server through the
storage connection alone, and opened in a headless Chromium (Debian's, driven by Playwright, the
launch of tests/deployment/test_browser.py), where every plot must have rendered. The screenshot is
kept in .posttrain/test/screenshots/run-report.png."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from posttrain.report.build import write_report
from posttrain.storage_fs import Store
from tests.conftest import TEST_HOME
from tests.deployment.conftest import chromium
from tests.report_workspace import TASKS, write_workspace
from tests.unit.test_report import COMMON, PARADIGM_PANELS

SCREENSHOT = TEST_HOME / "screenshots" / "run-report.png"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium, launched as tests/deployment/test_browser.py launches it."""
    with chromium() as browser:
        yield browser


def test_report_of_an_s3_workspace_through_the_connection(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    from posttrain.hooks.storage import StorageHook

    bucket = f"report-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    ws = write_workspace(f"s3://{bucket}/root", "kd")
    # The task reaches the bucket with its storage connection alone, as in a deployment.
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key, raising=False)
    uri, report = write_report(ws, TASKS, locate=StorageHook("aws_moto").store)
    assert uri == f"{ws}/report.html" and report.run.problems == []
    assert [p.key for p in report.panels] == COMMON[:5] + PARADIGM_PANELS["kd"] + COMMON[5:]
    assert all(p.has_data for p in report.panels)
    assert report.run.examples[0].prompt == "What is 0 plus 0?"  # the eval file, read from the bucket
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    assert Store.at(uri).read_text() == report.html


def test_the_report_renders_in_chromium(browser: Any, tmp_path: Path) -> None:
    ws = write_workspace(str(tmp_path / "storage"), "grpo")
    uri, report = write_report(ws, TASKS)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    requested: list[str] = []

    def nothing_but_the_file(route: Any) -> None:  # the report is self-contained: it fetches nothing
        requested.append(route.request.url)
        route.abort()

    context.route("http*://**/*", nothing_but_the_file)
    try:
        page = context.new_page()
        page.goto(f"file://{uri}")
        page.wait_for_load_state("load")
        images = page.evaluate("Array.from(document.images).map(i => [i.closest('section').id, i.complete, "
                               "i.naturalWidth, i.naturalHeight])")
        sections = page.evaluate("Array.from(document.querySelectorAll('section.panel')).map(s => s.id)")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
    finally:
        context.close()
    assert sections == [p.key for p in report.panels]
    plotted = {p.key for p in report.panels if "<img" in p.body}
    assert {i[0] for i in images} == plotted and len(plotted) >= 10
    assert all(done and width > 0 and height > 0 for _, done, width, height in images), images
    assert requested == []
