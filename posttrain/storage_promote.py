"""What promotion needs of a store: a verified copy inside it, and a conditional pointer write.

A model is copied without passing through this process where source and target share a store:
S3 CopyObject (the server copies the bytes) or a local file copy. Each copy is then checked
against the export's COMMIT (size and sha256) at the target, and the target gets its own COMMIT
last, so a folder with a COMMIT is a complete, checked copy.

How the sha256 is checked on S3 without downloading: CopyObject is asked for
`ChecksumAlgorithm=SHA256`, so S3 computes the sha256 of the target's bytes as it writes them;
`HeadObject(ChecksumMode=ENABLED)` returns it and it is compared with the COMMIT's. CopyObject
takes objects up to 5 GiB; a larger one is copied in parts (UploadPartCopy, the source's part
layout kept) and checked by size and by ETag equal to the source's: S3 returns no whole-object
sha256 for a multipart object, so its sha256 is not re-checked (the ETag is the MD5 of the part
MD5s, the same parts give the same ETag). A store that returns no checksum (some S3-compatible
servers) falls back to downloading the target to hash it, and says so in the log.

The pointer (champion.json) is swapped by compare-and-swap on the version read at decision time:
S3 `PutObject` with `If-Match: <etag>` (or `If-None-Match: *` when there was none); locally the
same comparison under an fcntl lock on a sibling lock file, then a write aside and os.replace.
Torch-free and airflow-free.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import IO

from posttrain.storage_fs import COMMIT, Store, is_local, scheme

log = logging.getLogger(__name__)

COPY_OBJECT_LIMIT = 5 << 30  # the largest object S3's CopyObject takes
_CONFLICT = {"PreconditionFailed", "ConditionalRequestConflict"}  # 412, and 409 for a concurrent one


def sha256_of(stream: IO[bytes]) -> dict:
    digest, size = hashlib.sha256(), 0
    while chunk := stream.read(8 << 20):
        digest.update(chunk)
        size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def tree_files(src: Store) -> dict[str, dict]:
    """Every file of the folder `src` with its size and sha256: from its COMMIT where it has one (an
    export published to an object store), else hashed here (a file:// export, read from local disk)."""
    if (src / COMMIT).exists():
        return (src / COMMIT).read_json()["files"]
    if not is_local(src.uri):
        raise RuntimeError(f"{src} has no {COMMIT}: its upload did not finish; run the stage that writes it again")
    files = {}
    for rel in sorted(src.sizes()):
        with (src / rel).open("rb") as fh:
            files[rel] = sha256_of(fh)
    return files


def same_store(a: Store, b: Store) -> bool:
    """Whether one filesystem reaches both, so that the store itself can copy from one to the other."""
    return scheme(a.uri) == scheme(b.uri) and (a.fs is b.fs or a.fs.storage_options == b.fs.storage_options)


def copy_verified(src: Store, dst: Store, want: dict) -> str:
    """Copy the file `src` to `dst` and check `dst` against `want` (size, sha256); returns how it
    was checked. Raises ValueError naming the file when the target differs."""
    if is_local(dst.uri) and is_local(src.uri):
        Path(dst.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.path, dst.path)
        with dst.open("rb") as fh:
            got, how = sha256_of(fh), "sha256 of the local copy"
    elif scheme(dst.uri) == "s3" and same_store(src, dst):
        got, how = _s3_copy(src, dst, want["size"])
    else:  # another store: the bytes pass through here, hashed on the way
        with src.open("rb") as fin, dst.open("wb") as fout:
            while chunk := fin.read(8 << 20):
                fout.write(chunk)
        with dst.open("rb") as fh:
            got, how = sha256_of(fh), "sha256 of the target, downloaded (source and target in different stores)"
    if {k: got.get(k, want[k]) for k in want} != want:
        raise ValueError(f"{dst}: copied from {src} it has {got}, but {COMMIT} lists {want}")
    return how


def _bucket_key(store: Store) -> tuple[str, str]:
    bucket, _, key = store.path.partition("/")
    return bucket, key


def _s3_copy(src: Store, dst: Store, size: int) -> tuple[dict, str]:
    (sb, sk), (db, dk) = _bucket_key(src), _bucket_key(dst)
    fs = dst.fs
    if size <= COPY_OBJECT_LIMIT:
        fs.call_s3("copy_object", Bucket=db, Key=dk, CopySource={"Bucket": sb, "Key": sk}, ChecksumAlgorithm="SHA256")
        head = fs.call_s3("head_object", Bucket=db, Key=dk, ChecksumMode="ENABLED")
        if head.get("ChecksumSHA256"):
            digest = base64.b64decode(head["ChecksumSHA256"]).hex()
            return {"size": head["ContentLength"], "sha256": digest}, "sha256 computed by the store (CopyObject)"
        log.warning("%s: the store returned no SHA256 checksum; downloading the copy to hash it", dst)
        with dst.open("rb") as fh:
            return sha256_of(fh), "sha256 of the target, downloaded (the store keeps no checksum)"
    fs.cp_file(src.path, dst.path, preserve_etag=True)
    heads = [fs.call_s3("head_object", Bucket=b, Key=k) for b, k in ((sb, sk), (db, dk))]
    if heads[0]["ETag"] != heads[1]["ETag"]:
        raise ValueError(f"{dst}: ETag {heads[1]['ETag']} differs from the source's {heads[0]['ETag']}")
    return {"size": heads[1]["ContentLength"]}, "size and ETag equal to the source's (multipart copy)"


def copy_tree_verified(src: Store, dst: Store) -> dict[str, dict]:
    """Copy the folder `src` to `dst`, check every file there, then write `dst`'s COMMIT last; returns
    the files (as a COMMIT lists them). A `dst` that already has the same COMMIT is left as it is
    (a retried task whose earlier try copied and died before it moved the pointer)."""
    files = tree_files(src)
    if (dst / COMMIT).exists() and (dst / COMMIT).read_json().get("files") == files:
        log.info("%s is already a complete copy of %s", dst, src)
        return files
    dst.remove()  # a partial copy of an earlier try
    for rel, want in files.items():
        how = copy_verified(src / rel, dst / rel, want)
        log.info("copied %s (%d bytes), checked by %s", rel, want["size"], how)
    (dst / COMMIT).write_json({"files": files, "source": src.uri})
    return files


def read_versioned(store: Store) -> tuple[bytes | None, str | None]:
    """The object's bytes and a token for `write_if` (None, None where there is none). On S3 the
    token (the ETag) is read before the bytes: if the object changes in between, the token is the
    older one and the conditional write fails, so a decision is never made on older bytes than its
    token names."""
    if is_local(store.uri):
        try:
            data = Path(store.path).read_bytes()
        except FileNotFoundError:
            return None, None
        return data, hashlib.sha256(data).hexdigest()
    bucket, key = _bucket_key(store)
    try:
        etag = store.fs.call_s3("head_object", Bucket=bucket, Key=key)["ETag"]
        return store.fs.cat_file(store.path), etag
    except FileNotFoundError:
        return None, None


def write_if(store: Store, data: bytes, token: str | None) -> bool:
    """Write `data` as the whole object only if it is still the version `token` names (None: only
    if there is none). Returns False, writing nothing, when another writer came first."""
    if is_local(store.uri):
        return _write_if_local(Path(store.path), data, token)
    bucket, key = _bucket_key(store)
    condition = {"IfMatch": token} if token else {"IfNoneMatch": "*"}
    try:
        store.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
    except OSError as exc:  # s3fs turns a 412/409 into an OSError whose cause is the ClientError
        code = getattr(exc.__cause__, "response", {}).get("Error", {}).get("Code")
        if isinstance(exc, FileExistsError) or code in _CONFLICT:
            return False
        raise
    store.fs.invalidate_cache(store.path)
    return True


def _write_if_local(target: Path, data: bytes, token: str | None) -> bool:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        try:
            current = hashlib.sha256(target.read_bytes()).hexdigest()
        except FileNotFoundError:
            current = None
        if current != token:
            return False
        tmp = target.with_name(f"{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise OSError(exc.errno or errno.EIO, f"{target}: could not write the pointer ({exc})") from exc
    return True
