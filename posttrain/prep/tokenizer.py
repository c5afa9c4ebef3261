"""The tokenizer is the single source of truth for how text becomes ids: loaded from the model's
location, fingerprinted in the manifest, and checked again wherever ids meet a model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from posttrain.storage_fs import workspace_store
from posttrain.uris import model_location


class TokenizerMismatch(RuntimeError):
    pass


def load_tokenizer(uri: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_location(uri))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What decides how text becomes ids: vocabulary, chat template, special tokens."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update((tokenizer.chat_template or "").encode())
    h.update(json.dumps(sorted(tokenizer.all_special_tokens)).encode())
    return h.hexdigest()[:16]


def require_same_tokenizer(location: str, workspace: Path) -> Any:
    """The tokenizer at `location`, if it is the one the workspace's data was prepared with."""
    manifest = (workspace_store(workspace) / "data" / "manifest.json").read_json()
    expected = manifest["tokenizer"]["fingerprint"]
    tokenizer = load_tokenizer(location)
    actual = tokenizer_fingerprint(tokenizer)
    if actual != expected:
        raise TokenizerMismatch(
            f"tokenizer at {location} has fingerprint {actual}, but {workspace}/data was prepared with {expected} "
            f"({manifest['tokenizer']['uri']}): the model would be trained or evaluated on ids of another tokenizer")
    return tokenizer
