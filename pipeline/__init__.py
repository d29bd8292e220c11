"""Training application: config, the CTRL trainer, Ray wiring, MLflow tracking, evaluation, CLI."""
