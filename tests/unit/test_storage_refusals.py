"""What an s3:// run still cannot do is refused at recipe load, naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.recipe import RecipeError, load_recipe
from posttrain.storage_fs import Store, job_workspace
from tests.conftest import write_recipe


@pytest.mark.parametrize(("sections", "field"), [
    ({"model": {"base": "s3://models/tiny"}}, "model.base"),
    ({"model": {"base": "/m", "tokenizer": "s3://models/tok"}}, "model.tokenizer"),
    ({"storage": {"root": "gs://bucket/runs"}}, "storage.root"),
])
def test_refused_locations_name_the_field(tmp_path: Path, sections: dict, field: str) -> None:
    path = write_recipe(tmp_path, **sections)
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    assert str(path) in str(exc.value) and field in str(exc.value)


def test_an_s3_storage_root_is_accepted(tmp_path: Path) -> None:
    assert load_recipe(write_recipe(tmp_path, storage={"root": "s3://bucket/runs/"})).storage.root == "s3://bucket/runs"


def test_stores_refuse_other_schemes() -> None:
    with pytest.raises(ValueError, match=r"gs://b/ws: storage scheme 'gs' is not supported"):
        Store.at("gs://b/ws")
    with pytest.raises(ValueError, match=r"workspace gs://b/ws: storage scheme 'gs'"):
        job_workspace("gs://b/ws")
