"""Ray Tune sweeps over the training run."""
