"""A per-node cache of models kept in an object store (`model.base`, `model.tokenizer`, `kd.teacher`
at s3://...): transformers and vLLM load from a local folder, so each node downloads a model once
and every stage on that node (train, evaluate, rollouts, the KD teacher) reuses the copy.

Where: `<POSTTRAIN_HOME>/cache/models/` (`cache_root()`), one folder per entry, plus `.lock`. The
teardown of a local head removes every entry no live process holds (`clear()`); nothing else points
into it.

Key of an entry (one listing of the folder decides it, so a hit downloads nothing):
- a folder with a `commit.json` (what posttrain publishes: every file's size and sha256, written
  last): the commit marker's ETag and size. The ETag changes whenever the marker is rewritten, i.e.
  whenever the checksums it lists change; the files are downloaded as the marker lists them and
  each is checked against its sha256. Only such complete folders are trusted as posttrain's own.
- a folder without one (a user's upload, e.g. `aws s3 sync`): every object's path, ETag and size.
  Each S3 object is whole once visible, but nothing marks the folder complete, so the listing is
  taken again after the download and the entry is refused if it changed meanwhile (an upload was
  still going on). Upload with `upload()` (it writes the `commit.json` last) to be certain.

Size: at most `POSTTRAIN_MODEL_CACHE_GIB` GiB (default 100) on a node; past it the least recently
used entries are removed, except any a live process has open (each process holds a shared lock on
the entries it returned), so the bound is exceeded while the models in use alone exceed it.

A job's own models pass through the cache too (`scratch()`, `publish()`): an export is written to a
scratch folder, uploaded with its commit.json, and becomes the entry for that upload, so an object-
store run keeps nothing of its own on the node outside this cache.

Concurrency: one lock file per node serialises lookups, downloads and eviction; a download goes to
a folder aside and is renamed into place, so a process never sees a partial entry (one killed
mid-download leaves a folder aside that the next holder of the lock removes).

Torch-free and airflow-free.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from fsspec import AbstractFileSystem

from posttrain.paths import posttrain_home
from posttrain.storage_fs import COMMIT, Store, upload_folder

BOUND_ENV = "POSTTRAIN_MODEL_CACHE_GIB"
DEFAULT_BOUND_GIB = 100.0
ENTRY = ".entry.json"  # in each entry: the URI it was first fetched from, the key's listing
SCRATCH = ".scratch-"  # + "<pid>-<label>": a job's model files on their way (see scratch())
_IN_USE: dict[str, IO[bytes]] = {}  # entry path → open file holding a shared lock while this process lives


def cache_root() -> Path:
    return posttrain_home() / "cache" / "models"


def bound_bytes() -> int:
    raw = os.environ.get(BOUND_ENV)
    try:
        gib = float(raw) if raw else DEFAULT_BOUND_GIB
    except ValueError:
        raise ValueError(f"{BOUND_ENV}={raw!r}: not a number of GiB") from None
    if gib <= 0:
        raise ValueError(f"{BOUND_ENV}={raw!r}: the cache bound must be positive")
    return int(gib * 2**30)


def _listing(store: Store) -> dict[str, dict]:
    """Every object below the folder: relative path → ETag and size (one LIST, no object GETs)."""
    found = store.fs.find(store.path, detail=True)
    listing = {p[len(store.path):].lstrip("/"): {"etag": str(info.get("ETag", "")).strip('"'),
                                                  "size": int(info["size"])}
               for p, info in found.items() if info.get("type") != "directory"}
    if not listing:
        raise FileNotFoundError(f"{store.uri}: no model here (the folder is empty or does not exist)")
    return listing


def _key(listing: dict[str, dict]) -> str:
    basis = {COMMIT: listing[COMMIT]} if COMMIT in listing else listing
    return hashlib.sha256(json.dumps(basis, sort_keys=True).encode()).hexdigest()[:32]


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _hold(entry: Path) -> None:
    """Mark the entry in use by this process (until it exits) and as just used (LRU order)."""
    (entry / ENTRY).touch()
    if str(entry) not in _IN_USE:
        fh = (entry / ENTRY).open("rb")
        fcntl.flock(fh, fcntl.LOCK_SH)
        _IN_USE[str(entry)] = fh


def _entry_bytes(entry: Path) -> int:
    return sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())


def _evict(root: Path, keep: Path | None, bound: int) -> list[str]:
    """Remove least recently used entries until the cache fits `bound`; never `keep`, never one a
    live process holds. Returns the removed entries' names."""
    entries = [p for p in root.iterdir() if p.is_dir() and (p / ENTRY).exists()]
    sizes = {p: _entry_bytes(p) for p in entries}
    total, removed = sum(sizes.values()), []
    for entry in sorted(entries, key=lambda p: (p / ENTRY).stat().st_mtime):
        if total <= bound:
            break
        if entry == keep or str(entry) in _IN_USE:
            continue
        with (entry / ENTRY).open("rb") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # another process is loading from it
            shutil.rmtree(entry)
        total -= sizes[entry]
        removed.append(entry.name)
    return removed


def _download(store: Store, listing: dict[str, dict], aside: Path) -> None:
    if COMMIT in listing:
        files = (store / COMMIT).read_json()["files"]
        store.get_tree(aside, files)  # checks every file's size and sha256 against the marker
        (aside / COMMIT).write_text(json.dumps({"files": files}, indent=2))
        return
    for rel in listing:
        target = aside / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        store.fs.get_file(f"{store.path}/{rel}", str(target))
    if _listing(store) != listing:
        raise RuntimeError(f"{store.uri} changed while it was downloaded (an upload still going on?) and has "
                           f"no {COMMIT} marking it complete; try again when the upload is done")


def upload(local: Path, uri: str, fs: AbstractFileSystem | None = None) -> dict[str, dict]:
    """Upload the model folder `local` to `uri` with its commit.json last (each file's size and
    sha256): how to put a model in S3 so nodes trust it as complete. Returns the marker's files."""
    store = Store.at(uri, fs)
    (store / COMMIT).remove()  # first: while the files change, no reader takes the folder as complete
    files = {}
    for item in sorted(local.rglob("*")):
        rel = str(item.relative_to(local))
        if item.is_file() and rel not in (COMMIT, ENTRY):  # a cache entry's own files are not the model's
            files[rel] = {"size": item.stat().st_size, "sha256": _sha256(item)}
            with item.open("rb") as src, (store / rel).open("wb") as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
    (store / COMMIT).write_json({"files": files})
    return files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def scratch(label: str) -> Iterator[Path]:
    """An empty folder of this node's cache for a job's model files on their way (an export before
    its upload, an adapter merged for evaluation), removed when the block ends; one whose process
    died is removed by the next download or the teardown."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"{SCRATCH}{os.getpid()}-{label}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _remove_orphans(root: Path) -> None:
    """Downloads and scratch folders whose process died (the caller holds the lock)."""
    for stale in root.glob(".fetching-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for folder in root.glob(f"{SCRATCH}*"):
        pid = folder.name[len(SCRATCH):].split("-", 1)[0]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def publish(local: Path, uri: str) -> Path:
    """Upload the model folder `local` (a job's fresh export, in a scratch folder) to `uri` with its
    commit.json last, replacing what was there, and keep the folder as this node's entry for that
    upload: a later stage on the node that loads `uri` (evaluate; the rollouts of a run whose base is
    this model once promoted) finds it without downloading. Returns the entry."""
    store = Store.at(uri)
    files = upload_folder(local, store)
    (local / COMMIT).write_text(json.dumps({"files": files}, indent=2))
    listing = _listing(store)
    root = cache_root()
    entry = root / _key(listing)
    with _locked(root):
        if not (entry / ENTRY).exists():  # else: the same upload (an identical export) is there already
            shutil.rmtree(entry, ignore_errors=True)
            (local / ENTRY).write_text(json.dumps({"uri": uri, "listing": listing, "fetched": time.time()}))
            local.rename(entry)
        _evict(root, entry, bound_bytes())
    return entry


def model_dir(uri: str, fs: AbstractFileSystem | None = None) -> Path:
    """The local folder holding the model at `uri` (s3://...), downloaded into this node's cache
    unless the current version is there already. `fs`: the filesystem to reach it (an Airflow task's,
    from its connection); default: configured from the environment as a Ray job's is."""
    store = Store.at(uri, fs)
    listing = _listing(store)
    root = cache_root()
    entry = root / _key(listing)
    with _locked(root):
        _remove_orphans(root)
        if not (entry / ENTRY).exists():
            aside = root / f".fetching-{entry.name}-{os.getpid()}"
            try:
                _download(store, listing, aside)
                (aside / ENTRY).write_text(json.dumps({"uri": uri, "listing": listing, "fetched": time.time()}))
                aside.rename(entry)
            finally:
                shutil.rmtree(aside, ignore_errors=True)
        _hold(entry)
        _evict(root, entry, bound_bytes())
    return entry


def clear() -> list[str]:
    """Remove every entry of this node's cache that no live process holds: a local head's teardown,
    once the run's stages are over (another run's models in use stay). Returns the removed names."""
    root = cache_root()
    if not root.is_dir():
        return []
    with _locked(root):
        _remove_orphans(root)
        return _evict(root, None, -1)


def model_file(uri: str, name: str, fs: AbstractFileSystem | None = None) -> Path | None:
    """The file `name` (e.g. config.json) of the model at `uri` without downloading the rest: that
    one object, kept under the cache's `files/` (outside any entry). None when it can't be read here
    (no such object, or no credentials: an Airflow worker reaches the store only through a task's
    connection, so the plan check there says it could not read the model's shape)."""
    try:
        data = (Store.at(uri, fs) / name).read_bytes()
    except Exception:  # noqa: BLE001 (missing object, no credentials, unreachable: the caller says why)
        return None
    target = cache_root() / "files" / hashlib.sha256(f"{uri}/{name}".encode()).hexdigest()[:32] / name
    target.parent.mkdir(parents=True, exist_ok=True)
    aside = target.with_name(f"{name}.{os.getpid()}.tmp")
    aside.write_bytes(data)
    os.replace(aside, target)  # concurrent readers of the same file see one whole version
    return target
