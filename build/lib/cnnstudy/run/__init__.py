"""One training run, as one function call (train.py): the Lightning module (classifier.py),
what is recorded in MLflow and how (tracking.py), signals and orphaned runs (lifecycle.py),
reproducing a run (reproduce.py) and the dashboard (dashboard.py)."""
