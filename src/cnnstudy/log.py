"""cnnstudy's own messages: the `cnnstudy` logger, printed plainly (the message alone),
information to standard output, warnings and errors to standard error, every line
redacted by the console scripts. Being a logger, Hydra's logging config routes or
silences it like any library's (`hydra.job_logging.loggers.cnnstudy.level=WARNING`,
or handlers of your own under `hydra/job_logging`). Imports nothing of cnnstudy."""

from __future__ import annotations

import logging
import sys

NAME = "cnnstudy"
_configured: list[bool] = []  # once per process: a logging config of the user's then wins


class _Console(logging.Handler):
    """To the streams of the moment (a console script wraps them to redact)."""

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        try:
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 -- logging's own rule: never raise from a handler
            self.handleError(record)


def get(name: str = "") -> logging.Logger:
    """The `cnnstudy` logger (or its child `cnnstudy.NAME`), set up on first use."""
    root = logging.getLogger(NAME)
    if not _configured:
        _configured.append(True)
        if not root.handlers:
            root.addHandler(_Console())
        if root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        root.propagate = False  # Hydra's root handler would print it twice, with stamps
    return root.getChild(name) if name else root


# Libraries' lines that a study's terminal does without (hydra.verbose shows them again):
# Hydra's "Launching 1 jobs locally" and "#N : overrides" for every job, Lightning's
# "`Trainer.fit` stopped" and batch-limit notes for every run, MLflow's table creation,
# matplotlib's "Using categorical units".
NOISE = (
    "hydra._internal.core_plugins.basic_launcher",
    "lightning.pytorch.utilities.rank_zero",
    "mlflow.store.db.utils",
    "alembic",
    "matplotlib",
)


def quiet_libraries() -> None:
    for name in NOISE:
        logging.getLogger(name).setLevel(logging.WARNING)
    # MLflow logs each database error with its traceback before raising it; the study
    # says the error once, in a line (cnnstudy.study.faults)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    # a tracking server's client prints "View run ... at: URL" for every run it ends: the
    # trial lines and the summary link the runs already
    import os

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
