"""The MLflow Model Registry, from the Airflow side: register a model version, move the champion alias.

mlflow (mlflow-skinny) is imported in `client`, never at module import: the dags folder parses
without it (tests/integration/test_dag_parsing.py), and a worker without it gets a clear error
from the first call, which the operators record instead of failing the promotion.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any

from airflow.sdk import BaseHook

from posttrain.registry import CHAMPION_ALIAS, TAG


class MlflowRegistryHook(BaseHook):
    hook_name = "MLflow registry"

    def __init__(self, tracking_uri: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.tracking_uri = tracking_uri

    @cached_property
    def client(self) -> Any:
        if self.tracking_uri.startswith(("http://", "https://")):
            # MLflow's defaults retry a dead server for minutes; the task would hang on a side channel.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        from mlflow import MlflowClient  # here: see the module doc

        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    def ensure_model(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            try:
                self.client.create_registered_model(name, tags={TAG + "managed_by": "airflow-provider-posttrain"},
                                                    description=f"posttrain recipe {name}")
            except MlflowException as again:  # another run registered it meanwhile
                if again.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise

    def find_version(self, name: str, workspace: str) -> Any | None:
        """The version already registered for this run workspace (a retried task registers once)."""
        escaped = workspace.replace("'", "\\'")
        found = self.client.search_model_versions(f"name = '{name}' and tags.`{TAG}workspace` = '{escaped}'")
        return max(found, key=lambda v: int(v.version)) if found else None

    def register(self, name: str, source: str, run_id: str | None, tags: dict[str, str]) -> Any:
        """A model version whose source is `source` (the workspace export: nothing is copied)."""
        self.ensure_model(name)
        existing = self.find_version(name, tags[TAG + "workspace"])
        if existing is not None and existing.source == source:
            self.set_tags(name, existing.version, tags)
            return existing
        return self.client.create_model_version(name, source=source, run_id=run_id, tags=tags)

    def set_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, value)

    def promote(self, name: str, version: str, tags: dict[str, str]) -> None:
        """Tag the version with the decision, then move the alias to it (the alias is the last word)."""
        self.set_tags(name, version, tags)
        self.client.set_registered_model_alias(name, CHAMPION_ALIAS, version)

    def champion(self, name: str) -> Any:
        return self.client.get_model_version_by_alias(name, CHAMPION_ALIAS)

    def experiment_of(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.experiment_id
