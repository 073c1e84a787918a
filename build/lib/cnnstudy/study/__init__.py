"""Studies over the config keys (the Optuna sweeper, search spaces, trials as MLflow runs,
analysis and reports): to come, on top of run.train.train()."""
