"""``pyramidkd search``: hyperparameter search with Optuna on top of the sweep launchers."""
