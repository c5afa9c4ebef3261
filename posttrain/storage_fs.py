"""Files of a run workspace at any URI: file:// (or a plain path) and s3:// through fsspec/s3fs.

Both sides use it: the Airflow tasks (which pass the filesystem their storage connection built, see
hooks/storage.py) and the Ray jobs (which build one from the environment: AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or the node's instance profile, as botocore finds them,
and AWS_ENDPOINT_URL(_S3) for an S3-compatible server such as moto's).

Object stores have no rename and no directories: a `Store` writes whole objects (`write_bytes`: a
single PUT on S3, a write aside and an os.replace on a local disk, so a reader never sees half of
one), and "a folder" is the prefix of the objects under it. Torch-free and airflow-free.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec import AbstractFileSystem

SCHEMES = ("file", "s3")
# Written last into a folder uploaded as a whole (an export, a checkpoint): a folder without it is
# incomplete (its writer died, or is still writing), and readers never use it.
COMMIT = "commit.json"


def scheme(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def is_local(uri: str) -> bool:
    return scheme(uri) == "file"


def storage_options(uri: str) -> dict[str, Any]:
    """What fsspec needs beyond the URI to reach the store, from the environment. Listings are never
    cached: a checkpoint another rank or an earlier job committed must be seen at once."""
    if scheme(uri) != "s3":
        return {}
    opts: dict[str, Any] = {"use_listings_cache": False}
    # botocore reads AWS_ENDPOINT_URL itself, but not every s3fs/aiobotocore pairing passes it on.
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    return opts


def filesystem(uri: str) -> tuple[AbstractFileSystem, str]:
    """The filesystem for `uri` (configured from the environment) and the path on it."""
    if scheme(uri) not in SCHEMES:
        raise ValueError(f"{uri}: storage scheme {scheme(uri)!r} is not supported; use file:// or s3://")
    fs, path = fsspec.core.url_to_fs(uri, **storage_options(uri))
    return fs, path


@dataclass(frozen=True)
class Store:
    """One location (a file or a folder) of a workspace: its URI, and the filesystem and path that
    reach it. `Store.at(uri)` configures the filesystem from the environment; `Store.at(uri, fs)`
    uses the one given (the Airflow task's, built from its connection)."""

    uri: str
    fs: AbstractFileSystem
    path: str

    @classmethod
    def at(cls, uri: str | Path, fs: AbstractFileSystem | None = None) -> Store:
        uri = str(uri).rstrip("/")
        if fs is None:
            fs, path = filesystem(uri)
        else:
            path = fs._strip_protocol(uri)
        return cls(uri, fs, path)

    def __truediv__(self, name: str) -> Store:
        name = name.strip("/")
        return Store(f"{self.uri}/{name}", self.fs, f"{self.path}/{name}")

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def local(self) -> Path | None:
        """The local path for file:// (None on an object store)."""
        return Path(self.path) if is_local(self.uri) else None

    def open(self, mode: str = "rb") -> IO[Any]:
        """A stream; writing one uploads in parts as it goes (s3fs's block size), so a writer holds
        one part in memory, not the whole object."""
        if "w" in mode and is_local(self.uri):
            self.fs.makedirs(self.fs._parent(self.path), exist_ok=True)
        return self.fs.open(self.path, mode)

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def read_json(self) -> Any:
        try:
            return json.loads(self.read_bytes())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{self.uri}: not valid JSON ({exc})") from exc

    def write_bytes(self, data: bytes) -> None:
        """The whole object at once: readers see the old one or the new one, never part of one."""
        if is_local(self.uri):
            target = Path(self.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        else:
            self.fs.pipe_file(self.path, data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def write_json(self, data: Any) -> None:
        self.write_text(json.dumps(data, indent=2))

    def listdir(self) -> list[str]:
        """Names of the entries directly below (files and prefixes); [] where there is nothing."""
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != self.path)

    def sizes(self) -> dict[str, int]:
        """Every file below, by path relative to here, with its size in bytes."""
        found = self.fs.find(self.path, detail=True)
        return {p[len(self.path):].lstrip("/"): int(info["size"]) for p, info in found.items()
                if info.get("type") != "directory"}

    def remove(self) -> None:
        """This file, or everything below this folder; nothing there is not an error."""
        if self.fs.exists(self.path):
            self.fs.rm(self.path, recursive=True)

    def put_tree(self, local: Path) -> dict[str, dict]:
        """Upload every file under the local folder `local` to here; returns each file's size and
        sha256 (taken from the bytes as they are sent), by path relative to `local`."""
        files = {}
        for item in sorted(local.rglob("*")):
            if item.is_file():
                rel = str(item.relative_to(local))
                with item.open("rb") as src, (self / rel).open("wb") as dst:
                    files[rel] = _copy(src, dst)
        return files

    def get_tree(self, local: Path, files: dict[str, dict]) -> None:
        """Download `files` (as put_tree returns them) from below here into the local folder `local`,
        checking each one's size and sha256."""
        for rel, want in files.items():
            target = local / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with (self / rel).open("rb") as src, target.open("wb") as dst:
                got = _copy(src, dst)
            if got != want:
                raise ValueError(f"{self / rel}: {got['size']} bytes with sha256 {got['sha256'][:12]}, but "
                                 f"{COMMIT} lists {want['size']} bytes with {want['sha256'][:12]}")


def _copy(src: IO[bytes], dst: IO[bytes]) -> dict:
    digest, size = hashlib.sha256(), 0
    while chunk := src.read(8 << 20):
        dst.write(chunk)
        digest.update(chunk)
        size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def workspace_store(workspace: Store | Path | str) -> Store:
    """The workspace as a Store: a Ray job's (already one), or an Airflow task's folder or URI."""
    return workspace if isinstance(workspace, Store) else Store.at(str(workspace))


def upload_folder(local: Path, store: Store) -> dict[str, dict]:
    """Replace what is at `store` with the local folder `local`, with the COMMIT (every file's size
    and sha256, taken from the bytes as they are sent) written last: a reader never takes a folder
    half uploaded, or half replaced, as complete. Returns the COMMIT's files."""
    (store / COMMIT).remove()  # first: while the files change, no reader takes the folder as complete
    store.remove()
    files = store.put_tree(local)
    (store / COMMIT).write_json({"files": files})
    return files
