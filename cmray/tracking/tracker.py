"""Rank 0's MLflow run, fed from a queue by one background thread."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmray.tracking.config import DEFAULT_ARTIFACTS, DEFAULT_TRACKING_URI, TrackingConfig

log = logging.getLogger(__name__)

# MLflow retries an unreachable server for minutes by default; a blink should cost seconds.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

RUN_KEY_TAG = "cmray.run_key"
PARAM_BATCH = 100  # MLflow's limit of params per log_batch call
RETRY_AFTER_S = 30.0  # after a failure, routine calls are dropped for this long
_STOP = object()


def _is_rejection(exc: BaseException) -> bool:
    """The server answered and refused this call (4xx): nothing suggests it is down."""
    status = getattr(exc, "get_http_status_code", lambda: 500)()
    return 400 <= int(status) < 500


def resolve_tracking_uri(uri: str) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else the local SQLite store made absolute
    (Ray workers do not run in the driver's directory)."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = Path(DEFAULT_TRACKING_URI.removeprefix("sqlite:///")).resolve()
    return f"sqlite:///{db}"


def _local_artifacts(uri: str) -> str | None:
    """Artifacts of a local SQLite store go beside it; a server decides its own."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    return (db.parent / Path(DEFAULT_ARTIFACTS).name).resolve().as_uri()


def find_run(client: Any, experiment_id: str, run_key: str) -> str | None:
    """The ID of the run tagged with ``run_key`` (a cmray run's storage path and name)."""
    key = run_key.replace("'", "\\'")
    runs = client.search_runs([experiment_id], f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1)
    return runs[0].info.run_id if runs else None


# MLflow 3's UI opens an experiment by its kind; untagged, it guessed GenAI ("Evaluation runs").
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


class Tracker:
    """One MLflow run, created or resumed (by ``run_key``) on first use.

    ``run_key`` identifies a training run across restarts (its storage path and name), so a
    resumed job continues its MLflow run instead of starting another. It nests under
    ``cfg.parent_run`` when that is set (a search's trials).
    """

    def __init__(
        self,
        cfg: TrackingConfig,
        run_name: str,
        run_key: str,
        params: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.run_name, self.run_key = cfg, run_name, run_key
        self.uri = resolve_tracking_uri(cfg.tracking_uri)
        self.parent_run_id = cfg.parent_run or None
        self.run_id: str | None = None
        self.failures = 0
        self._warned = False
        self._down_until = 0.0
        self._client: Any = None
        self._monitor: Any = None
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=10_000)
        self._thread = threading.Thread(target=self._serve, name="cmray-mlflow", daemon=True)
        self._thread.start()
        if params:
            self.submit(lambda c, r: self._log_params(c, r, params))

    # ------------------------------------------------------------------ public, non-blocking

    def submit(self, op: Callable[[Any, str], None], essential: bool = False) -> None:
        """Queue ``op(client, run_id)``. While the server is down, non-essential calls are
        dropped (and counted) instead of each waiting out a timeout; essential ones (the
        model, the end of the run) are always tried."""
        try:
            self._queue.put_nowait((op, essential))
        except queue.Full:
            self.failures += 1

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.submit(lambda c, r: c.log_batch(r, metrics=batch, synchronous=True))

    def log_image(self, image: Any, key: str, step: int) -> None:
        self.submit(lambda c, r: c.log_image(r, image, key=key, step=step, synchronous=True))

    def log_dict(self, data: dict[str, Any], name: str) -> None:
        self.submit(lambda c, r: c.log_dict(r, data, name))

    def log_text(self, text: str, name: str) -> None:
        self.submit(lambda c, r: c.log_text(r, text, name))

    def started(self, timeout: float = 30.0) -> str | None:
        """The run's ID once it exists (waiting at most ``timeout`` s); None while MLflow is
        unreachable."""
        ready = threading.Event()
        self.submit(lambda c, r: ready.set(), essential=True)
        ready.wait(timeout)
        return self.run_id

    def close(self, status: str = "FINISHED", timeout: float = 300.0) -> str | None:
        """Send what is queued (waiting at most ``timeout`` s), end the run; its ID or None."""
        self.submit(lambda c, r: c.set_terminated(r, status), essential=True)
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._monitor is not None:
            self._monitor.finish()
        return self.run_id

    # ------------------------------------------------------------------------ the thread

    def _serve(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            op, essential = item
            if not essential and time.monotonic() < self._down_until:
                self.failures += 1
                continue
            try:
                op(self._ensure_client(), self._ensure_run())
            except Exception as exc:  # a tracking failure must never reach training
                if not _is_rejection(exc):  # unreachable or failing: back off
                    self._down_until = time.monotonic() + RETRY_AFTER_S
                self._warn(exc)

    def _warn(self, exc: BaseException) -> None:
        self.failures += 1
        if not self._warned:
            self._warned = True
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning("MLflow at %s failed (%s); training continues", self.uri, first)
            print(
                f"[cmray] warning: MLflow at {self.uri} failed ({first}); training continues "
                "and logging keeps retrying",
                flush=True,
            )

    def _ensure_client(self) -> Any:
        if self._client is None:
            import mlflow
            from mlflow import MlflowClient

            mlflow.set_tracking_uri(self.uri)
            self._client = MlflowClient(self.uri)
        return self._client

    def _ensure_run(self) -> str:
        if self.run_id is None:
            client = self._client
            experiment = self._experiment(client)
            self.run_id = self._find_run(client, experiment) or self._create_run(client, experiment)
            self._start_monitor()
        return self.run_id

    def _experiment(self, client: Any) -> str:
        found = client.get_experiment_by_name(self.cfg.experiment)
        if found is None:
            kind = {EXPERIMENT_KIND_TAG: MODEL_TRAINING}
            return client.create_experiment(self.cfg.experiment, _local_artifacts(self.uri), kind)
        if EXPERIMENT_KIND_TAG not in found.tags:  # made before cmray tagged; a user's kind stays
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return found.experiment_id

    def _find_run(self, client: Any, experiment: str) -> str | None:
        run_id = find_run(client, experiment, self.run_key)
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
        return run_id

    def _create_run(self, client: Any, experiment: str) -> str:
        tags = {RUN_KEY_TAG: self.run_key}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        return client.create_run(experiment, tags=tags, run_name=self.run_name).info.run_id

    def _start_monitor(self) -> None:
        if not self.cfg.system_metrics or self._monitor is not None:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(
            self.run_id, sampling_interval=10, resume_logging=True, tracking_uri=self.uri
        )
        self._monitor.start()

    @staticmethod
    def _log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
        """New params are logged. A resumed run may change some (more steps, say); MLflow
        forbids changing a param, so those are recorded in a tag instead."""
        from mlflow.entities import Param

        logged = client.get_run(run_id).data.params
        values = {k: str(v)[:6000] for k, v in params.items()}
        changed = {k: v for k, v in values.items() if k in logged and logged[k] != v}
        if changed:
            note = ", ".join(f"{k}: {logged[k]} -> {v}" for k, v in changed.items())
            client.set_tag(run_id, "cmray.resumed_with", note[:5000])
        items = [Param(k, v) for k, v in values.items() if k not in logged]
        for start in range(0, len(items), PARAM_BATCH):
            client.log_batch(run_id, params=items[start : start + PARAM_BATCH], synchronous=True)
