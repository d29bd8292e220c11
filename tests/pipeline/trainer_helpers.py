"""Shared by the in-process trainer tests: a tiny CPU config and a reporter that records what the loop
sends (metrics, checkpoint steps and states)."""
from __future__ import annotations

TINY = ["model.preset=csc_ctrl_debug", "train.batch_size_per_worker=8", "train.precision=fp32",
        "data.synthetic=true", "scaling.num_workers=0", "train.image_every=0", "tracking.log_model=false"]


class Recorder:
    def __init__(self):
        self.logged, self.checkpoints, self.states = [], [], []

    def metrics(self, step, metrics):
        self.logged.append((step, metrics))

    def images(self, step, trainer, x):
        pass

    def checkpoint(self, step, state, metrics):
        self.checkpoints.append(step)
        self.states.append(state)
