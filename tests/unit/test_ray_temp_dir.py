"""Ray's temp dir: every Unix socket Ray makes under it must fit in 107 bytes, or a dashboard
module dies at start ("Module MetricsHead failed to start") depending on the checkout's depth and
the pid's digits."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain import paths
from posttrain.paths import ray_temp_dir

# The longest socket Ray 2.60 makes, with the widest pid Linux can hand out.
WORST = "/session_2026-11-29_20-07-39_549032_4194303/sockets/dash_TaskEventsHead"


@pytest.mark.parametrize("depth", [0, 3, 6, 9, 12])
def test_the_longest_ray_socket_fits_at_any_checkout_depth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          depth: int) -> None:
    monkeypatch.setattr(paths, "_pid_digits", lambda: 7)
    home = Path("/w") / "/".join(["abcdefgh"] * depth) / ".posttrain"
    monkeypatch.setenv("POSTTRAIN_HOME", str(home))
    temp = ray_temp_dir("ab12cd")
    assert len(str(temp) + WORST) <= 107
    if len(str(home / "ray" / "ab12cd")) + len(WORST) <= 107:
        assert temp == home / "ray" / "ab12cd"  # the repo's folder wherever it fits


def test_the_real_ray_sockets_are_the_ones_sized_for() -> None:
    """If a Ray upgrade adds a longer dashboard module name, the size above must grow with it."""
    import ast

    import ray.dashboard

    root = Path(ray.dashboard.__file__).parent
    names = [node.name for path in root.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.ClassDef) and any(getattr(b, "id", "") == "SubprocessModule" for b in node.bases)]
    assert names and max(len(f"dash_{n}") for n in names) <= len("dash_TaskEventsHead"), names
