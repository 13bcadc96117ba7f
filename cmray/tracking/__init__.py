"""MLflow tracking: the only part of cmray that imports mlflow.

:class:`Tracker` is rank 0's run. Every call is queued and sent by a background thread, so the
training loop never waits on the tracking server and never fails because of it: the first
failure is warned about once, later calls keep trying, and training goes on regardless.
"""

from __future__ import annotations

from cmray.tracking.config import TrackingConfig
from cmray.tracking.tracker import Tracker, resolve_tracking_uri

__all__ = ["Tracker", "TrackingConfig", "resolve_tracking_uri"]
