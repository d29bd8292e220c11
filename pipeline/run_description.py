"""The description of a training run's MLflow run (the tag ``mlflow.note.content``, markdown), written once
when the run is created, so that the runs table says what a run is without opening its params:

    CSC-CTRL csc_ctrl_32: 32 px grey, d = 16, csc layers, 4 stages
    Objective: multiclass over 10 classes + sample-wise term (λ₂ = 0.01) + R(Z) (1) + dictionary loss (1) on stages 1
    Data: runs/demo/shards/fmnist [train], 10000 images
    Global batch 256 = 2 workers × 128; 150 steps
    Hardware: 2 workers × 1 CPU, no GPU          (or: 8 × NVIDIA H200, 1 GPU per worker)
    Started by: cscctrl demo --storage runs/demo

The command is the one that started the run (``tracking.command``, filled in by pipeline/launch.py).
"""
from __future__ import annotations

from typing import Any

from pipeline.config import ExperimentConfig
from pipeline.redact import redact
from sharding.manifest import read_manifest

def model_line(cfg: ExperimentConfig) -> str:
    m = cfg.model
    colour = {1: "grey", 3: "RGB"}.get(m.in_channels, f"{m.in_channels} channels")
    return (f"CSC-CTRL {m.preset or '(no preset)'}: {m.image_size} px {colour}, d = {m.nz}, {m.layer} layers, "
            f"{m.num_stages} stages")


def objective_line(cfg: ExperimentConfig, num_classes: int) -> str:
    o = cfg.objective
    game = f"multiclass over {num_classes} classes" if o.mode == "multiclass" else "binary"
    extra = ""
    if o.consistency_weight:
        extra += f" + sample-wise term (λ₂ = {o.consistency_weight:g})"
    if o.rate_weight:
        extra += f" + R(Z) ({o.rate_weight:g})"
    if o.dictionary_weight:
        stages = ", ".join(str(s) for s in o.dictionary_stages)
        extra += f" + dictionary loss ({o.dictionary_weight:g}) on stages {stages}"
    return f"Objective: {game}{extra}"


def data_line(cfg: ExperimentConfig, train_samples: int | None) -> str:
    if cfg.data.synthetic:
        return "Data: synthetic (one fixed random batch per worker)"
    count = f", {train_samples} images" if train_samples is not None else ""
    return f"Data: {redact(cfg.data.shards)} [{cfg.data.train_split}]{count}"


def hardware_line(cfg: ExperimentConfig, gpu_name: str = "") -> str:
    s = cfg.scaling
    workers = max(1, s.num_workers)
    if s.use_gpu:
        return f"Hardware: {workers} × {gpu_name or 'GPU'}, {s.gpus_per_worker:g} GPU per worker"
    return f"Hardware: {workers} worker{'s' if workers > 1 else ''} × {s.cpus_per_worker:g} CPU, no GPU"


def describe_run(cfg: ExperimentConfig, *, num_classes: int, train_samples: int | None = None,
                 gpu_name: str = "") -> str:
    """The description text (one fact per line, as in the module docstring)."""
    t, workers = cfg.train, max(1, cfg.scaling.num_workers)
    lines = [model_line(cfg), objective_line(cfg, num_classes), data_line(cfg, train_samples),
             f"Global batch {cfg.global_batch_size} = {workers} worker{'s' if workers > 1 else ''} × "
             f"{t.batch_size_per_worker}; {t.steps} steps",
             hardware_line(cfg, gpu_name),
             f"Started by: {cfg.tracking.command or '(not recorded: not started from the cscctrl command line)'}"]
    return "  \n".join(lines)  # markdown line breaks


def train_samples_of(cfg: ExperimentConfig, manifest: Any = None) -> int | None:
    """Samples of the training split as the manifest lists them (None for synthetic data)."""
    if cfg.data.synthetic:
        return None

    return (manifest or read_manifest(cfg.data.shards)).num_samples(cfg.data.train_split)
