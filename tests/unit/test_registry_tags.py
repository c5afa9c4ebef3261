"""What the registry and the champion Asset event say about a model (posttrain/registry.py), and
how OpenLineage names a URI (posttrain/operators/lineage.py)."""

from __future__ import annotations

from pathlib import Path

from posttrain.operators.lineage import dataset_name
from posttrain.recipe import load_recipe
from posttrain.registry import (
    asset_extra,
    decision_tags,
    digest,
    registry_uri,
    run_link,
    ui_url,
    version_link,
    version_tags,
)
from tests.conftest import write_recipe


def test_registry_uri_defaults_to_the_training_store_and_refuses_a_per_run_one(tmp_path: Path) -> None:
    local = load_recipe(write_recipe(tmp_path, name="a"))
    assert registry_uri(local) == (f"sqlite:///{(tmp_path / 'storage').resolve()}/a/mlflow.db", None)
    on_s3 = load_recipe(write_recipe(tmp_path, name="b", storage={"root": "s3://bucket/p"}))
    uri, why = registry_uri(on_s3)
    assert uri is None and "tracking.mlflow_uri" in why
    served = load_recipe(write_recipe(tmp_path, name="c", tracking={"mlflow_uri": "http://127.0.0.1:5000/"}))
    assert registry_uri(served)[0] == "http://127.0.0.1:5000/" and ui_url(served) == "http://127.0.0.1:5000"
    assert ui_url(local) is None and run_link(None, "1", "r") is None and version_link(None, "a", "1") is None
    assert version_link("http://ui", "my model", "3") == "http://ui/#/models/my%20model/versions/3"


def test_tags_and_asset_extra(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, name="t"))
    manifest = {"tokenizer": {"fingerprint": "tok"}, "splits": {}}
    tags = version_tags(recipe, recipe_json={"b": 1, "a": 2}, manifest=manifest, eval_meta={"eval_fingerprint": "ev"},
                        run_id="r1", workspace="file:///w", metrics={"eval_loss": 1.23456789, "note": "x"},
                        provider_version="0.1.0")
    assert tags["posttrain.recipe_sha256"] == digest({"a": 2, "b": 1})  # key order does not matter
    assert tags["posttrain.data_manifest_sha256"] == digest(manifest)
    assert (tags["posttrain.tokenizer_fingerprint"], tags["posttrain.eval_fingerprint"]) == ("tok", "ev")
    assert tags["posttrain.metric.eval_loss"] == "1.23457" and "posttrain.metric.note" not in tags
    decision = {"version": "v2", "decision": "confidence", "metric": "eval_loss", "value": 1.5, "reason": "beats",
                "model_uri": "file:///p/v2", "comparison": {"n": 64, "difference": -0.25, "low": -0.4, "high": -0.1,
                                                            "confidence_level": 0.95}}
    assert decision_tags(decision)["posttrain.comparison.low"] == "-0.4"
    extra = asset_extra(decision, {"name": "t", "version": "2", "run_id": "m1", "tracking_uri": "sqlite:///x"}, "r2")
    assert (extra["interval"], extra["n"], extra["difference"]) == ([-0.4, -0.1], 64, -0.25)
    assert (extra["version"], extra["model_version"]) == ("v2", "2")
    assert (extra["mlflow_run_id"], extra["run_id"]) == ("m1", "r2")


def test_openlineage_dataset_names() -> None:
    assert dataset_name("file:///data/train.jsonl") == ("file", "/data/train.jsonl")
    assert dataset_name("/data/x") == ("file", "/data/x")
    assert dataset_name("s3://bucket/a/b.parquet") == ("s3://bucket", "a/b.parquet")
