"""The tokenizer is the single source of truth for how text becomes ids: loaded from the model's
location, fingerprinted in the manifest, and checked again wherever ids meet a model."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fsspec import AbstractFileSystem

from posttrain.storage_fs import Store, workspace_store
from posttrain.uris import model_location

# The filesystem that reaches a model's URI (an Airflow task's, from its storage connection).
ModelFs = Callable[[str], AbstractFileSystem]


class TokenizerMismatch(RuntimeError):
    pass


def load_tokenizer(uri: str, models: ModelFs | None = None) -> Any:
    """The tokenizer at `uri`; an s3:// one through this node's model cache, reached with
    `models(uri)` where given (else the environment's credentials, as on a Ray node)."""
    from transformers import AutoTokenizer

    if models is not None and uri.startswith("s3://"):
        from posttrain import model_cache

        return AutoTokenizer.from_pretrained(str(model_cache.model_dir(uri, models(uri))))
    return AutoTokenizer.from_pretrained(model_location(uri))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of everything that decides how text becomes ids and which ids mean what: the
    vocabulary and merges, the normalizer, pre-tokenizer, post-processor and decoder, the added
    tokens with their flags (special, lstrip/rstrip, normalized, single_word), the chat template
    and the special tokens with their roles (eos, pad, ...)."""
    h = hashlib.sha256()
    h.update(_canonical(_pipeline(tokenizer)).encode())
    h.update(_canonical(tokenizer.chat_template or "").encode())  # a str, or a dict of named templates
    h.update(_canonical(sorted(tokenizer.all_special_tokens)).encode())
    # The roles too: swapping which token is eos changes the end-of-turn label and the stop token.
    h.update(_canonical({role: str(token) for role, token in tokenizer.special_tokens_map.items()}).encode())
    return h.hexdigest()[:16]


def _pipeline(tokenizer: Any) -> Any:
    """The tokenizer's pipeline as plain data. For a fast tokenizer that is the backend's own JSON
    (tokenizer.json) less its truncation and padding state, which a caller sets per call and which
    the prepared ids never depend on (prepare truncates and pads itself)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        return state
    # A Python (slow) tokenizer has no such JSON: the vocabulary and the added tokens with their flags.
    flags = ("content", "special", "lstrip", "rstrip", "normalized", "single_word")
    added = {i: {f: getattr(t, f, None) for f in flags} for i, t in sorted(tokenizer.added_tokens_decoder.items())}
    return {"class": type(tokenizer).__name__, "vocab": tokenizer.get_vocab(), "added_tokens": added}


def _canonical(value: Any) -> str:
    """Stable text for a digest: keys sorted, list order kept (the order of merges is their rank)."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def require_same_tokenizer(location: str, workspace: Store | Path) -> Any:
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
