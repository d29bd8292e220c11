"""The names of the metrics a training run reports: one home for the trainer (pipeline/trainer.py), the
worker (pipeline/worker.py), the evaluation (pipeline/evaluate.py) and the sweep checks (tuning/spec.py).

A trainer report holds ``{player}/{term}`` for both players and every CTRL term of the objective's mode
(models/ctrl.py CTRLTerms), the coding measures of pipeline/diagnostics.py, and the TRAIN_METRICS below.
The end-of-training evaluation adds ``eval/`` + each key of ``evaluate_model``'s metrics.
"""
from __future__ import annotations

import dataclasses

from models.ctrl import CTRLTerms
from pipeline.config import ExperimentConfig
from pipeline.diagnostics import coding_metric_names

PLAYERS = ("encoder", "decoder")

STEP = "train/step"
"""The training step of a report: what ASHA and the trial table measure progress in."""

RECON_MSE = "train/recon_mse"
RECON_PSNR = "train/recon_psnr"
COS_Z_ZHAT = "train/cos_z_zhat"
IMAGES_PER_S = "perf/images_per_s"
STEP_MS = "perf/step_ms"
DATA_WAIT = "perf/data_wait_fraction"
ENCODER_LR = "optim/encoder_lr"
DECODER_LR = "optim/decoder_lr"
TRAIN_METRICS = (RECON_MSE, RECON_PSNR, COS_Z_ZHAT, STEP, IMAGES_PER_S, STEP_MS, DATA_WAIT, ENCODER_LR, DECODER_LR)

# Added by the worker (pipeline/worker.py) to what the trainer reports, over all ranks.
DATA_WAIT_MEAN = "perf/data_wait_fraction_mean"
DATA_WAIT_MAX = "perf/data_wait_fraction_max"
LOST_SAMPLES = "data/lost_samples"
CORRUPT_SHARD_READS = "data/corrupt_shard_reads"

EVAL_PREFIX = "eval/"
EVAL_IMAGE_METRICS = ("mse", "psnr", "ssim", "cos_z_zhat", "item_match", "images")
"""Keys of ``evaluate_model``'s metrics besides the coding measures and the objective's terms."""

TERMS_OF_MODE = {"binary": {"delta_r_z_zhat"}, "multiclass": {"delta_r_z", "delta_r_zhat", "delta_r_pairs"}}
ALWAYS_TERMS = {"objective", "consistency", "rate_z"}


def player_metric(player: str, term: str) -> str:
    return f"{player}/{term}"


def term_names(mode: str) -> list[str]:
    """Names of the CTRL terms the trainer logs for an objective mode (models/ctrl.py CTRLTerms)."""
    present = TERMS_OF_MODE[mode]
    return [f.name for f in dataclasses.fields(CTRLTerms) if f.name in ALWAYS_TERMS | present]


def training_metrics(cfg: ExperimentConfig) -> set[str]:
    """Keys of every periodic report of the trainer (pipeline/trainer.py ``log_metrics``)."""
    names = {player_metric(p, t) for p in PLAYERS for t in term_names(cfg.objective.mode)}
    return names | set(coding_metric_names(cfg.model)) | set(TRAIN_METRICS)


def evaluation_metrics(cfg: ExperimentConfig) -> set[str]:
    """Keys the end-of-training evaluation adds to the last report (pipeline/evaluate.py)."""
    names = {EVAL_PREFIX + k for k in EVAL_IMAGE_METRICS}
    names |= {EVAL_PREFIX + k for k in coding_metric_names(cfg.model)}
    return names | {f"{EVAL_PREFIX}objective/{t}" for t in term_names(cfg.objective.mode)}


HISTORY_METRICS = (RECON_PSNR, "decoder/objective", "decoder/delta_r_z_zhat", "decoder/delta_r_z",
                   "decoder/delta_r_zhat", "decoder/delta_r_pairs", COS_Z_ZHAT, "code/stage1/residual",
                   "code/stage1_psnr", "atoms/stage1/roughness", "atoms/stage1/drift")
"""Training curves the evaluation report draws, when the run's MLflow history has them (the ΔR names by
mode; the coding measures only for CSC models)."""
