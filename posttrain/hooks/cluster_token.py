"""The run's Ray auth token, kept in the run's storage: `<workspace>/secrets/ray-token`.

The setup task makes it (or finds the one an earlier try made, so a retried setup still speaks to
the nodes that try launched) and starts the cluster with it; every later task, each trigger on a
triggerer and the teardown read it from there with the storage connection (`read_token` in
`posttrain.hooks.ray`), so none of them depends on the disk of the machine the setup ran on. The
teardown deletes it once the cluster is gone.

Access: on a local disk, a 0600 file in a 0700 folder; on S3, an object of the run's bucket, which
only principals the bucket's policy admits may read (S3 objects are never public unless a policy
says so), i.e. whoever may already read the run's data and checkpoints. It is never in XCom, a
trigger's kwargs, a log line (masked once read) or the DAG run's conf.
"""

from __future__ import annotations

import os
import secrets

from posttrain.hooks.storage import StorageHook

SECRETS = "secrets"
TOKEN = f"{SECRETS}/ray-token"


def token_uri(workspace: str) -> str:
    return f"{workspace.rstrip('/')}/{TOKEN}"


def ensure_token(storage: StorageHook, workspace: str) -> str:
    """The run's token: the one already in the workspace, else a new one written there now."""
    from airflow.sdk.log import mask_secret

    store = storage.store(token_uri(workspace))
    token = store.read_text().strip() if store.exists() else ""
    if not token:
        token = secrets.token_urlsafe(32)
        local = store.local
        if local is None:
            store.write_bytes(token.encode())
        else:
            local.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            local.parent.chmod(0o700)  # an existing folder keeps its mode otherwise
            tmp = local.with_name(local.name + ".tmp")
            # Created 0600: never readable by others, not even between open and chmod.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(token)
            os.replace(tmp, local)
    mask_secret(token)
    return token


def remove_token(storage: StorageHook, workspace: str) -> None:
    """Delete the run's secrets (nothing there is not an error)."""
    storage.store(f"{workspace.rstrip('/')}/{SECRETS}").remove()
