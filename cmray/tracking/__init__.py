"""MLflow tracking: the only part of cmray that imports mlflow.

:class:`Tracker` is rank 0's run. Every call is queued and sent by a background thread, so the
training loop never waits on the tracking server and never fails because of it: the first
failure is warned about once, later calls keep trying, and training goes on regardless.
"""

from __future__ import annotations

from cmray.models import register_resolver
from cmray.tracking.config import TrackingConfig
from cmray.tracking.sources import mlflow_source
from cmray.tracking.tracker import Tracker, resolve_tracking_uri

# Every model reader (cmray.models.load_model) accepts models:/ and runs:/ URIs from here on.
register_resolver(mlflow_source)

__all__ = ["Tracker", "TrackingConfig", "resolve_tracking_uri"]
