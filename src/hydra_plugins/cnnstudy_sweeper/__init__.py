"""cnnstudy's Hydra sweeper: Optuna 5 studies from `cnnstudy-train -m` (cnnstudy.study)."""
