"""MLflow as the default logger, on an embedded store (design.md section 3).

`sqlite:///mlflow.db` with artifacts in `./mlartifacts` of the working directory unless `tracking_uri` (one
config key) or the `MLFLOW_TRACKING_URI` environment variable says otherwise. mlflow 3 refuses the plain
`./mlruns` file store and Lightning's bare `MLFlowLogger()` therefore fails (design.md section 6): this subclass
always resolves a URI.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """The store to log to; a relative SQLite path is made absolute (against the working directory) because mlflow
    caches one SQLAlchemy engine per URI string: a second run in the same process from another directory would
    otherwise write into the first directory's database."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and uri != prefix + ":memory:":
        uri = prefix + os.path.abspath(uri[len(prefix) :])
    return uri


class MLflowLogger(MLFlowLogger):
    def __init__(
        self,
        experiment_name: str = "ddt-lightning",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        artifact_location: str | None = None,
        tags: dict[str, str] | None = None,
        log_model: bool = False,
    ) -> None:
        uri = resolve_tracking_uri(tracking_uri)
        if artifact_location is None and uri.startswith("sqlite:"):
            artifact_location = Path("mlartifacts").resolve().as_uri()
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=uri,
            artifact_location=artifact_location,
            tags=tags,
            log_model=log_model,
        )

    def describe(self) -> str:
        """Where the run is, and the command that shows it."""
        return (
            f"MLflow run {self.run_id} (experiment {self._experiment_name!r}) in {self._tracking_uri}; "
            f"view it with: mlflow ui --backend-store-uri {self._tracking_uri}"
        )
