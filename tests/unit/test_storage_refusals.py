"""Locations a run cannot use are refused at recipe load, naming the file and the field; s3:// is
accepted for the storage root and for every model location (read through each node's model cache)."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.recipe import RecipeError, load_recipe
from posttrain.storage_fs import Store
from tests.conftest import write_recipe


@pytest.mark.parametrize(("sections", "field"), [
    ({"model": {"base": "gs://models/tiny"}}, "model.base"),
    ({"model": {"base": "/m", "tokenizer": "gs://models/tok"}}, "model.tokenizer"),
    ({"paradigm": "kd", "kd": {"teacher": "gs://models/teacher"}}, "kd.teacher"),
    ({"storage": {"root": "gs://bucket/runs"}}, "storage.root"),
])
def test_refused_locations_name_the_field(tmp_path: Path, sections: dict, field: str) -> None:
    path = write_recipe(tmp_path, **sections)
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    assert str(path) in str(exc.value) and field in str(exc.value)


def test_an_s3_storage_root_is_accepted(tmp_path: Path) -> None:
    assert load_recipe(write_recipe(tmp_path, storage={"root": "s3://bucket/runs/"})).storage.root == "s3://bucket/runs"


def test_s3_model_locations_are_accepted_as_they_are(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, paradigm="kd", model={"base": "s3://m/tiny", "tokenizer": "s3://m/tok"},
                                      kd={"teacher": "s3://m/teacher"}))
    assert (recipe.model.base, recipe.model.tokenizer, recipe.kd.teacher) == ("s3://m/tiny", "s3://m/tok",
                                                                            "s3://m/teacher")


def test_stores_refuse_other_schemes() -> None:
    with pytest.raises(ValueError, match=r"gs://b/ws: storage scheme 'gs' is not supported"):
        Store.at("gs://b/ws")
