"""MLflow tracking of a training job: one run per workspace, params at the start, metrics per step.

Tracking is a side channel: the first MLflow error prints one warning and turns tracking off for
the job, so a bad URI or a tracking server that is down never stops training (metrics.jsonl in the
workspace is still written). mlflow is imported only here, and only when a run starts: inside the
guard, so a broken install turns tracking off too instead of failing the job at import.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.recipe import Recipe
from posttrain.storage_fs import SCHEMES, Store, is_local, scheme
from posttrain.uris import local_path

OBJECT_STORES = tuple(s for s in SCHEMES if s != "file")  # a tracking URI there is a RunDatabase
MAX_PARAM_CHARS = 500  # what every MLflow server accepts (newer ones take 6000)


def tracking_uri(recipe: Recipe, workspace: Store) -> str:
    """The recipe's tracking URI, else a SQLite database: `<storage root>/<recipe>/mlflow.db` for a
    file:// root (one database per recipe, its runs side by side). SQLite needs a filesystem with
    locks, which S3 is not, and a job on an object-store workspace writes nothing to its node's disk:
    for an s3:// root the database is the run's own, `<workspace>/train/mlflow.db` (that URI is
    returned), held in the job's memory and saved there whole (see RunDatabase). Browse one with
    `mlflow ui --backend-store-uri sqlite:///mlflow.db` after downloading it; set tracking.mlflow_uri
    to a tracking server for one store across runs (and a registry to promote into)."""
    if recipe.tracking.mlflow_uri:
        return recipe.tracking.mlflow_uri
    if not is_local(recipe.storage.root):
        return (workspace / "train" / "mlflow.db").uri
    return f"sqlite:///{local_path(recipe.storage.root).resolve() / recipe.name / 'mlflow.db'}"


class RunDatabase:
    """An MLflow SQLite database kept in this process's memory and saved whole to an object
    (`target`): loaded from it when it exists (a resumed job continues its run), written back by
    `save`. SQLite's shared-cache in-memory database lets MLflow's engine and the connection kept
    here see one database; it lives as long as that connection."""

    def __init__(self, target: Store):
        self.target = target
        name = f"posttrain_mlflow_{os.getpid()}_{id(self)}"
        self.keeper = sqlite3.connect(f"file:{name}?mode=memory&cache=shared", uri=True, check_same_thread=False)
        if target.exists():
            saved = sqlite3.connect(":memory:")
            saved.deserialize(target.read_bytes())
            saved.backup(self.keeper)
            saved.close()
        self.sqlalchemy_uri = f"sqlite:///file:{name}?mode=memory&cache=shared&uri=true"

    def save(self) -> None:
        self.target.write_bytes(self.keeper.serialize())


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts as dotted keys with string values (lists and None as JSON), as MLflow params."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = re.sub(r"[^\w./ -]", "_", f"{prefix}{key}")
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[name] = text[:MAX_PARAM_CHARS]
    return out


class MlflowRun:
    """The job's MLflow run. A job that resumes in the same workspace (a retried task, a restarted
    worker) continues the run recorded in `run_file` rather than starting another. A `uri` in an
    object store (s3://…/mlflow.db, see tracking_uri) is a RunDatabase; `save` writes it there."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_file: Store,
                 artifact_location: str | None = None):
        self.uri = uri
        self.client: Any = None
        self.run_id: str | None = None
        self.database: RunDatabase | None = None
        self._guard(self._start, experiment, run_name, run_file, artifact_location)

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def _start(self, experiment: str, run_name: str, run_file: Store, artifact_location: str | None) -> None:
        if self.uri.startswith(("http://", "https://")):
            # MLflow's defaults retry a dead server for minutes before failing; training would wait.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        if self.uri.startswith("sqlite:///"):
            Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        client_uri = self.uri
        if scheme(self.uri) in OBJECT_STORES:
            self.database = RunDatabase(Store.at(self.uri))
            client_uri = self.database.sqlalchemy_uri
        from mlflow import MlflowClient  # here, not at the top: see the module doc

        client = MlflowClient(client_uri)
        previous = json.loads(run_file.read_text()) if run_file.exists() else {}
        if previous.get("tracking_uri") == self.uri:
            run_id = previous["run_id"]
            client.update_run(run_id, status="RUNNING")
        else:
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(experiment, artifact_location)
            run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
            run_file.write_text(json.dumps({"tracking_uri": self.uri, "run_id": run_id}))
        self.client, self.run_id = client, run_id

    def _guard(self, call: Callable[..., None], *args: Any) -> None:
        try:
            call(*args)
        except Exception as exc:  # whatever MLflow raises: tracking must never stop training
            print(f"warning: MLflow tracking ({self.uri}) is off for the rest of this job: "
                  f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}", flush=True)
            self.client, self.run_id = None, None

    def log_params(self, params: dict[str, str]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param  # mlflow: see the module doc

        # A resumed run already has its params, and MLflow refuses to change one (a retry may have
        # raised max_steps): log only the new ones, and say which changed.
        existing: dict[str, str] = {}
        self._guard(lambda: existing.update(self.client.get_run(self.run_id).data.params))
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        if changed:
            print(f"MLflow run {self.run_id} resumed with changed params (kept the first values): "
                  + ", ".join(f"{k}={existing[k]}→{params[k]}" for k in changed), flush=True)
        items = [Param(k, v) for k, v in params.items() if k not in existing]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            if self.active:
                self._guard(lambda batch: self.client.log_batch(self.run_id, params=batch), items[start:start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric  # mlflow: see the module doc

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._guard(lambda: self.client.log_batch(self.run_id, metrics=batch))

    def save(self) -> None:
        """Write a RunDatabase to its object (nothing to do for a server or a SQLite file)."""
        if self.database is not None:
            self._guard(self.database.save)

    def finish(self) -> None:
        if self.active:
            self._guard(lambda: self.client.set_terminated(self.run_id, "FINISHED"))
        self.client, self.run_id = None, None
