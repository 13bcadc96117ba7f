"""MLflow model URIs as model sources, registered with ``cmray.models`` by ``cmray.tracking``."""

from __future__ import annotations

from cmray.models import ModelSourceError
from cmray.models.files import one_line
from cmray.tracking.config import is_mlflow_uri


def mlflow_source(source: str) -> str | None:
    """The local model file of ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or
    ``runs:/ID/model`` (downloaded from the tracking store); None for any other source."""
    if not is_mlflow_uri(source):
        return None
    from cmray.tracking.models import fetch_model

    try:
        return str(fetch_model(source))
    except Exception as exc:  # MLflow raises its own types for unknown names, runs, stores
        raise ModelSourceError(f"{source}: {one_line(exc)}") from None
