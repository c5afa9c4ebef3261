"""Where things named in a recipe live: one place that turns a recipe's locations (model, teacher,
tokenizer, data, storage root) into what each consumer needs.

- `resolve_uri`: a path without a scheme is taken relative to the recipe's folder (file://).
- `local_path`: the filesystem path of a file:// URI.
- `model_location`: what `from_pretrained` takes (a local folder, or org/name for hf://).
- `model_dir`: the local folder with a model's files (hf:// through the Hugging Face cache, s3://
  through this node's model cache: posttrain/model_cache.py downloads it once per node and version).
- `model_file`: one file of a model (e.g. config.json): a local one if it is already here (nothing
  is fetched for hf://), for s3:// that one object alone.

Torch-free and airflow-free: the recipe schema, the plan check and the Ray jobs all use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def resolve_uri(value: str, base_dir: str | Path) -> str:
    """A path without a scheme is taken relative to `base_dir` and becomes a file:// URI."""
    if "://" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path(base_dir) / path
    return "file://" + str(path.resolve())


def local_path(uri: str) -> Path:
    """The filesystem path of a file:// URI (or a plain path)."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" in uri:
        raise ValueError(f"{uri} is not a local path")
    return Path(uri)


MODEL_SCHEMES = ("file", "hf", "s3")


def check_model_uri(value: str) -> str:
    """A model location's scheme is one this module resolves (the recipe validators call it)."""
    scheme = value.split("://", 1)[0] if "://" in value else "file"
    if scheme not in MODEL_SCHEMES:
        raise ValueError(f"model location scheme {scheme!r} is not supported; use a local path, s3:// or hf://org/name")
    return value


def model_location(uri: str) -> str:
    """What from_pretrained takes: a local folder for file:// (or plain paths) and s3:// (through the
    node's model cache), org/name for hf://."""
    if uri.startswith("hf://"):
        return uri.removeprefix("hf://")
    if uri.startswith("s3://"):
        return str(model_dir(uri))
    return str(local_path(uri))


def model_dir(uri: str) -> Path:
    """The local folder with the model's safetensors (hf:// names resolve through the HF cache,
    which holds the files in production images; nothing is fetched when HF_HUB_OFFLINE is set)."""
    if uri.startswith("hf://"):
        # Imported here: the DAG processor and the recipe schema never need the hub client.
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(uri.removeprefix("hf://"), allow_patterns=["*.json", "*.safetensors"]))
    if uri.startswith("s3://"):
        from posttrain import model_cache  # fsspec/s3fs only where an s3:// model is named

        return model_cache.model_dir(uri)
    return local_path(uri)


def model_file(uri: str, name: str, fs: Any = None) -> Path | None:
    """The model's file `name` (e.g. config.json): in the local folder, or in the Hugging Face cache
    for an hf:// model (nothing is downloaded), that one object for s3:// (through `fs`, an fsspec
    filesystem, where given). None when it isn't there."""
    if uri.startswith("hf://"):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(uri.removeprefix("hf://"), name)
        return Path(cached) if isinstance(cached, str) else None
    if uri.startswith("s3://"):
        from posttrain import model_cache

        return model_cache.model_file(uri, name, fs)
    path = local_path(uri) / name
    return path if path.exists() else None
