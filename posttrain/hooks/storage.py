"""Run workspaces and promoted models through Airflow's ObjectStoragePath: file:// by default,
s3:// (or any fsspec scheme) with the recipe's storage connection."""

from __future__ import annotations

import json
from typing import Any

from airflow.sdk import BaseHook, ObjectStoragePath

from posttrain.storage_fs import Store


class StorageHook(BaseHook):
    def __init__(self, conn_id: str | None = None):
        super().__init__()
        self.conn_id = conn_id

    def path(self, uri: str) -> ObjectStoragePath:
        return ObjectStoragePath(uri, conn_id=self.conn_id) if self.conn_id else ObjectStoragePath(uri)

    def store(self, uri: str) -> Store:
        """`uri` as a torch-free, airflow-free Store (what prepare writes through), reaching the
        store with this hook's connection."""
        return Store.at(uri, fs=self.path(uri).fs)

    def node_environment(self) -> dict[str, str]:
        """The AWS_* variables with which a process reaches the workspace as this hook's connection
        does: the credentials (resolved now: keys, or a role's temporary ones), the S3 endpoint and
        the region. Empty without an AWS connection.

        For a local Ray head: the setup task starts the head with these in its process environment,
        and every job driver and worker inherits them from the raylet, the way a node on EC2 has its
        instance profile. So they never appear in a job's entrypoint, runtime_env or metadata (all
        of which the Ray dashboard and the Jobs API show), nor in task logs (the amazon provider
        masks the secret and the token once read here), XCom or the workspace. What sees them: the
        head's processes and whoever may read /proc/<pid>/environ as their user, which on a local
        head is the user who already holds the connection. Temporary credentials end with their
        session: a job that outlives them needs a node role instead."""
        if not self.conn_id or self.get_connection(self.conn_id).conn_type != "aws":
            return {}
        from airflow.providers.amazon.aws.hooks.s3 import S3Hook

        hook = S3Hook(aws_conn_id=self.conn_id)
        creds = hook.get_credentials()
        env = {"AWS_ACCESS_KEY_ID": creds.access_key, "AWS_SECRET_ACCESS_KEY": creds.secret_key,
               "AWS_SESSION_TOKEN": creds.token or "",
               "AWS_ENDPOINT_URL_S3": hook.conn_config.get_service_endpoint_url(service_name="s3") or "",
               "AWS_DEFAULT_REGION": hook.conn_config.region_name or ""}
        return {k: v for k, v in env.items() if v}

    def read_json(self, uri: str) -> Any:
        return json.loads(self.path(uri).read_text())

    def exists(self, uri: str) -> bool:
        return self.path(uri).exists()

    def write_json_atomic(self, uri: str, data: Any) -> None:
        """Readers see the old file or the new one, never half of one: write aside, then rename."""
        target = self.path(uri)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path(uri + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.rename(target)
