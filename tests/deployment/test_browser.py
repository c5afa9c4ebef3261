"""The Airflow UI in a headless Chromium (Debian's, driven by Playwright; nothing downloaded), as a
user sees it: log in, the trigger form of posttrain__tiny-sft with the recipe's typed and bounded
params, an out-of-bounds value refused, and after a run the grid and the train task's log.
Screenshots land in .posttrain/deploy/screenshots/. Every request off 127.0.0.1 is blocked."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlparse

import pytest

from posttrain.overrides import OVERRIDES, override_schema
from tests.deployment.conftest import SCREENSHOTS, SFT_DAG, Deployment, chromium

pytestmark = [pytest.mark.slow, pytest.mark.deployment]

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as browser:
        yield browser


@pytest.fixture
def page(browser: Any, deployment: Deployment) -> Iterator[Any]:
    """A logged-in page; requests to anything but loopback are aborted (and listed)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    blocked: list[str] = []

    def only_loopback(route: Any) -> None:
        if urlparse(route.request.url).hostname in LOOPBACK:
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    context.route("**/*", only_loopback)
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.goto(f"{deployment.url}/dags/{SFT_DAG}")
    page.get_by_label("Username").wait_for()
    shot(page, "login")
    page.get_by_label("Username").fill(deployment.username)
    page.get_by_label("Password").fill(deployment.password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"**/dags/{SFT_DAG}")
    try:
        yield page
    finally:
        context.close()
    print(f"blocked non-loopback requests: {blocked}")


def shot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def field(form: Any, name: str) -> Any:
    return form.locator(f"input[name='element_{name}']")


def test_trigger_form_shows_typed_bounded_params_and_refuses_out_of_bounds(page: Any) -> None:
    page.get_by_role("button", name="Trigger").first.click()
    form = page.get_by_role("dialog")
    form.get_by_text("Run Parameters").wait_for()
    for name in OVERRIDES:
        # Each param: a field under a label of its name ('*' when required), described by the
        # recipe schema's text for its field.
        assert form.locator("label").filter(has_text=re.compile(rf"^{re.escape(name)}\s*\*?\s*$")).count() == 1
        help_text = form.locator(f"[id='{field(form, name).get_attribute('aria-describedby')}']")
        assert help_text.inner_text() == override_schema(name)["description"]
    # Numbers are number fields carrying the schema's bounds.
    for name in ("learning_rate", "max_steps", "seed", "min_improvement"):
        schema = override_schema(name)
        assert field(form, name).get_attribute("role") == "spinbutton"
        if "maximum" in schema:
            assert field(form, name).get_attribute("aria-valuemax") == str(schema["maximum"])
        if "minimum" in schema:
            assert field(form, name).get_attribute("aria-valuemin") == str(schema["minimum"])
    shot(page, "trigger-form")

    learning_rate = field(form, "learning_rate")
    learning_rate.fill("5")  # the schema's maximum is 1
    learning_rate.press("Tab")
    shot(page, "trigger-form-out-of-bounds")
    assert float(learning_rate.input_value()) == override_schema("learning_rate")["maximum"]
    form.get_by_role("button", name="Close").click()


def test_grid_and_train_log_after_a_run(page: Any, deployment: Deployment, sft_run: dict[str, Any]) -> None:
    run = quote(sft_run["run_id"], safe="")
    page.goto(f"{deployment.url}/dags/{SFT_DAG}/runs/{run}")
    for task in ("resolve_recipe", "validate_data", "prepare_data", "ray_cluster", "train", "evaluate", "promote",
                 "ray_cluster_teardown"):
        page.get_by_text(task, exact=True).first.wait_for()
    shot(page, "grid")

    page.goto(f"{deployment.url}/dags/{SFT_DAG}/runs/{run}/tasks/train")
    for step in (1, 5):  # the Ray job's loss lines, as the trigger streamed them into the task log
        page.get_by_text(re.compile(rf"step {step}/5 loss \d")).first.wait_for()
    shot(page, "train-log")
