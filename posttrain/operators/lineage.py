"""What each task read and wrote, as OpenLineage datasets (the apache-airflow-providers-openlineage
listener calls `get_openlineage_facets_on_complete` on the operator after a task succeeds).

The provider is imported only there, after the task ran: parsing the dags folder never loads it,
and a deployment without it simply never calls in.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit


def dataset_name(uri: str) -> tuple[str, str]:
    """(namespace, name) per OpenLineage's naming: s3://bucket + key, file + absolute path."""
    if "://" not in uri or uri.startswith("file://"):
        return "file", uri.removeprefix("file://")
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc}", parts.path.lstrip("/") or "/"


def operator_lineage(inputs: list[str], outputs: list[str]) -> Any:
    from airflow.providers.common.compat.openlineage.facet import Dataset
    from airflow.providers.openlineage.extractors import OperatorLineage

    def datasets(uris: list[str]) -> list[Any]:
        return [Dataset(*dataset_name(u)) for u in dict.fromkeys(u for u in uris if u)]

    return OperatorLineage(inputs=datasets(inputs), outputs=datasets(outputs))
