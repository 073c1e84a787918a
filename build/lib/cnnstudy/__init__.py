"""cnnstudy: hyperparameter studies for convolutional neural networks."""

import os

__version__ = "0.1.0"

# MLflow 3 sends usage telemetry from a background thread, which also draws from Python's
# global `random` while a run trains. Studies must be repeatable and often run offline:
# off unless the user says otherwise (set MLFLOW_DISABLE_TELEMETRY=false to allow it).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
