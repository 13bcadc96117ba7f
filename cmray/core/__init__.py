"""Pure-PyTorch math of consistency models: no Ray, no MLflow, no I/O."""
