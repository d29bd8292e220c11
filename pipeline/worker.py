"""What runs on each Ray Train worker: ``train_loop_per_worker(config_dict)``.

The config arrives as a plain dict (the Ray boundary) and is re-typed on the first line. Every rank
calls ``ray.train.report`` the same number of times (at the logging and checkpoint cadences); only rank
0 attaches a checkpoint, talks to MLflow and prints progress.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline import distributed
from pipeline import metric_names as N
from pipeline.checkpoint import (CheckpointError, check_architecture, checkpoint_dir_name, load_ray_checkpoint,
                                 newest_intact, save_state)
from pipeline.config import ConfigError, ExperimentConfig
from pipeline.datasets import shard_dataset
from pipeline.evaluate import evaluate_at_end, training_images
from pipeline.resume import config_changes, record_changes
from pipeline.run_description import describe_run, train_samples_of
from pipeline.tracking import MLflowTracker
from pipeline.trainer import CTRLTrainer, checkpoint_due
from sharding.manifest import read_manifest
from sharding.stream import make_train_loader

log = logging.getLogger(__name__)


def train_loop_per_worker(config_dict: dict[str, Any]) -> dict[str, float]:
    cfg = ExperimentConfig.from_dict(config_dict)
    import ray.train

    local_mode = cfg.scaling.num_workers == 0
    quiet_ray_train_reports()
    rank, world = distributed.rank(), distributed.world_size()
    device = _device(cfg, local_mode)
    state = _resume_state(cfg, local_mode)
    start_step = int(state["step"]) if state else 0
    changes = _resume_changes(cfg, state)

    num_classes = resolve_num_classes(cfg)
    batches = make_batches(cfg, rank=rank, world_size=world, start_step=start_step, device=device)
    tracker = None
    if rank == 0:
        tracker = MLflowTracker(cfg, cfg.run.name, run_dir=run_dir(cfg),
                                parent_run_id=cfg.tracking.parent_run_id or None,
                                description=run_description(cfg, num_classes, device))
        open_tracking(cfg, tracker)
        if state:
            print(f"[cscctrl] resuming {cfg.run.name} from step {start_step}"
                  f"{' (same MLflow run)' if tracker.resumed else ''}", flush=True)
            if changes:
                record_changes(tracker, changes, start_step)
                print(f"[cscctrl] resumed with changed settings (recorded in MLflow): "
                      f"{'; '.join(str(c) for c in changes)}", flush=True)
    reporter = RunReporter(cfg, tracker, local_mode=local_mode, ray_train=ray.train, device=device,
                           reader_stats=batches.stats)
    trainer = CTRLTrainer(cfg, device=device, num_classes=num_classes, batches=batches,
                          reporter=reporter, state=state)
    try:
        metrics = trainer.fit()
    except BaseException:
        if tracker:
            tracker.finish("FAILED")
        raise
    if tracker:
        metrics.update(evaluate_at_end(cfg, trainer, tracker))
    # A last report on every rank (Ray keeps rank 0's): the end-of-training evaluation, for Tune.
    ray.train.report(metrics)
    if tracker:
        if cfg.tracking.log_model:
            version = tracker.log_model(trainer.raw_encoder, trainer.raw_decoder, reporter.last_images)
            if version:
                print(f"[cscctrl] registered model {cfg.tracking.registered_model} version {version}"
                      f" (alias '{cfg.tracking.alias}')", flush=True)
        tracker.finish("FINISHED")
    return metrics


def run_description(cfg: ExperimentConfig, num_classes: int, device: torch.device) -> str:
    """The new MLflow run's description (pipeline/run_description.py)."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return describe_run(cfg, num_classes=num_classes, train_samples=train_samples_of(cfg), gpu_name=gpu)


def open_tracking(cfg: ExperimentConfig, tracker: Any) -> None:
    """Rank 0, once the MLflow run is open: the shard sets the run reads as its dataset inputs (the training
    split; the evaluation split when the run evaluates at its end), and system metrics sampling."""
    if not cfg.data.synthetic:
        manifest = read_manifest(cfg.data.shards)
        datasets = [shard_dataset(cfg.data.shards, cfg.data.train_split, "training", manifest)]
        if cfg.train.eval_batches and cfg.data.eval_split in manifest.splits:
            datasets.append(shard_dataset(cfg.data.shards, cfg.data.eval_split, "evaluation", manifest))
        tracker.log_datasets(datasets)
    if cfg.tracking.system_metrics_interval_s > 0:
        tracker.start_system_metrics(cfg.tracking.system_metrics_interval_s)


def quiet_ray_train_reports() -> None:
    """Ray Train 2.60 logs each ``ray.train.report`` at INFO with its whole metrics dict (a screenful per
    log step, through a logger named after its source file); the progress line already shows them."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def run_dir(cfg: ExperimentConfig) -> str:
    return f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"


def _device(cfg: ExperimentConfig, local_mode: bool) -> torch.device:
    if not cfg.scaling.use_gpu:
        return torch.device("cpu")
    if local_mode:
        return torch.device("cuda")
    import ray.train.torch

    device = ray.train.torch.get_device()
    torch.cuda.set_device(device)
    return device


def _resume_state(cfg: ExperimentConfig, local_mode: bool) -> dict[str, Any] | None:
    """The newest intact checkpoint of this run name: Ray's (restored from storage_path/name), or in local
    mode the newest one this module persisted itself; a damaged one (pipeline/checkpoint.py) is passed over
    to the next older one, naming it. A checkpoint of another architecture (say a CSC run resumed under
    the same run.name with model.layer=conv) is refused by its stored config."""
    import ray.train

    state, source = None, ""
    ckpt = None if local_mode else ray.train.get_checkpoint()
    if ckpt is not None:
        try:
            state, source = load_ray_checkpoint(ckpt), ckpt.path
        except CheckpointError as e:
            if distributed.rank() == 0:
                print(f"[cscctrl] {e}; looking for an older intact checkpoint of run {cfg.run.name}", flush=True)
    if state is None:  # also when Ray has no record of the run's checkpoints: they are not lost
        path, state, damaged = newest_intact(run_dir(cfg))
        source = path or ""
        if distributed.rank() == 0:
            for d in damaged:
                print(f"[cscctrl] checkpoint {d.path} is damaged and passed over: {d.reason}", flush=True)
    if state is not None:
        check_architecture(state, cfg.model, source)
    return state


def _resume_changes(cfg: ExperimentConfig, state: dict[str, Any] | None) -> list[Any]:
    """The config keys that differ from the checkpoint's (pipeline/resume.py): ConfigError for a key that
    may not change (`cscctrl train` refuses these before Ray starts; this catches every other caller)."""
    if not state or not isinstance(state.get("config"), dict):
        return []

    changes = config_changes(state["config"], cfg.to_dict())
    fixed = [c for c in changes if not c.mutable]
    if fixed:
        raise ConfigError(f"run {cfg.run.name} was trained with other settings ({'; '.join(map(str, fixed))}); "
                          f"refusing to resume it with these. Choose another run.name.")
    return changes


def resolve_num_classes(cfg: ExperimentConfig) -> int:
    if cfg.objective.mode == "binary":
        return 1
    if cfg.objective.num_classes:
        return cfg.objective.num_classes
    if cfg.data.synthetic:
        return 10

    return read_manifest(cfg.data.shards).num_classes_in(cfg.data.train_split)


def synthetic_batches(cfg: ExperimentConfig, device: torch.device, num_classes: int = 10) -> Iterator[tuple[Tensor, Tensor]]:
    """A fixed random batch on the device, forever (benchmarks: the step without any data path):
    x ~ U[−1, 1) of shape (batch_size_per_worker, model.in_channels, image_size, image_size)."""
    m = cfg.model
    g = torch.Generator().manual_seed(cfg.run.seed + distributed.rank())
    x = (torch.rand(cfg.train.batch_size_per_worker, m.in_channels, m.image_size, m.image_size, generator=g) * 2 - 1)
    labels = torch.randint(0, num_classes, (cfg.train.batch_size_per_worker,), generator=g)
    x, labels = x.to(device), labels.to(device)
    while True:
        yield x, labels


class Batches:
    """The training batches, forever, and the shard reader's counters (None for synthetic data)."""

    def __init__(self, batches: Iterator[tuple[Tensor, Tensor]], stats: Any = None) -> None:
        self.batches, self.stats = batches, stats

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> tuple[Tensor, Tensor]:
        return next(self.batches)


def make_batches(cfg: ExperimentConfig, *, rank: int, world_size: int, start_step: int,
                 device: torch.device) -> Batches:
    if cfg.data.synthetic:
        return Batches(synthetic_batches(cfg, device))

    loader = make_train_loader(
        cfg.data.shards, split=cfg.data.train_split, image_size=cfg.model.image_size,
        batch_size=cfg.train.batch_size_per_worker, steps_per_epoch=max(1, cfg.train.steps - start_step),
        num_workers=cfg.data.loader_workers, seed=cfg.run.seed, rank=rank, world_size=world_size,
        flip=cfg.data.flip, dequantize=cfg.data.dequantize, shuffle_buffer=cfg.data.shuffle_buffer,
        channels=cfg.model.in_channels, pin_memory=device.type == "cuda")
    # The data position: the resampled stream's epoch is the step it starts at, so a resumed run draws
    # a fresh, deterministic order (seeded by (seed, rank, step)) instead of replaying the first batches.
    loader.set_epoch(start_step)
    return Batches(_forever(loader), loader.stats)


def _forever(loader: Any) -> Iterator[tuple[Tensor, Tensor]]:
    while True:
        yield from loader


class RunReporter:
    """Sends the loop's measurements to the terminal, MLflow (rank 0) and Ray (every rank)."""

    def __init__(self, cfg: ExperimentConfig, tracker: Any, *, local_mode: bool, ray_train: Any,
                 device: torch.device | None = None, reader_stats: Any = None) -> None:
        self.cfg = cfg
        self.tracker = tracker
        self.local_mode = local_mode
        self.ray_train = ray_train
        self.device = device or torch.device("cpu")
        self.reader_stats = reader_stats
        self.t_start = time.perf_counter()
        self.first_psnr: float | None = None
        self.last_images: Tensor | None = None  # two images of the last pictured batch: the model's example

    def data_counts(self, metrics: dict[str, float]) -> dict[str, float]:
        """Over all ranks (a collective: every rank calls it at the same steps): the shard reader's losses
        summed, data/lost_samples (sample reads the manifest promised that were not delivered: damaged tar
        stretches, unreadable shards, undecodable images) and data/corrupt_shard_reads; and the share of the
        logging window each rank waited for data (perf/data_wait_fraction, rank 0's, is in ``metrics``):
        perf/data_wait_fraction_mean and perf/data_wait_fraction_max (the slowest rank's)."""
        world, rank = distributed.world_size(), distributed.rank()
        values = torch.zeros(2 + world, dtype=torch.float64 if self.device.type == "cpu" else torch.float32,
                             device=self.device)
        if self.reader_stats is not None:
            values[0], values[1] = self.reader_stats.lost_samples, self.reader_stats.corrupt_shards
        values[2 + rank] = metrics.get(N.DATA_WAIT, 0.0)  # one slot per rank: the sum gathers
        distributed.all_reduce_sum_(values)
        lost, shards, *waits = values.tolist()
        out = {N.DATA_WAIT_MEAN: sum(waits) / world, N.DATA_WAIT_MAX: max(waits)}
        if self.reader_stats is not None:
            out.update({N.LOST_SAMPLES: lost, N.CORRUPT_SHARD_READS: shards})
        return out

    def metrics(self, step: int, metrics: dict[str, float]) -> None:
        metrics.update(self.data_counts(metrics))
        if self.tracker:
            self.tracker.log_metrics(step, metrics)
            if self.tracker.system_metrics is not None:  # beside CPU and GPU use in the System metrics tab
                self.tracker.system_metrics.log_now(
                    {"data_wait_percentage": 100.0 * metrics[N.DATA_WAIT_MEAN]})
            print(progress_line(step, self.cfg.train.steps, metrics), flush=True)
        # At a checkpoint step the checkpoint's report carries these metrics: Ray Train's controller takes
        # one report per worker per poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), so a second one would wait.
        if not checkpoint_due(self.cfg.train, step):
            self.ray_train.report(metrics)

    def images(self, step: int, trainer: CTRLTrainer, x: Tensor) -> None:
        """Rank 0: the training pictures as images of the run's image view, keyed by name (recon,
        atoms_stage1, …) at this step, so the run page scrubs through them as training goes on."""
        if not self.tracker:
            return

        self.last_images = x[:2].detach().float().cpu()
        for name, image in training_images(trainer, x).items():
            self.tracker.log_image(image, key=name, step=step)

    def checkpoint(self, step: int, state: dict[str, Any], metrics: dict[str, float]) -> None:
        name = checkpoint_dir_name(step)
        if self.tracker:  # every report up to this step is delivered or journaled (pipeline/outbox.py)
            self.tracker.sync()
        if self.local_mode:
            self._persist_local(state, name)
            self.ray_train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if distributed.rank() == 0:
                save_state(state, d)
                ckpt = self.ray_train.Checkpoint.from_directory(d)
            self.ray_train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=name)

    def _persist_local(self, state: dict[str, Any], name: str) -> None:
        """In-process runs (scaling.num_workers=0) keep their own newest checkpoints."""
        root = Path(run_dir(self.cfg))
        save_state(state, root / name)
        existing = sorted(p for p in root.glob("checkpoint_step*") if p.is_dir())
        for old in existing[:-self.cfg.scaling.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)


def progress_line(step: int, total: int, m: dict[str, float]) -> str:
    ips = m.get(N.IMAGES_PER_S, 0.0)
    remaining = (total - step) * m.get(N.STEP_MS, 0.0) / 1000.0
    eta = time.strftime("%H:%M:%S", time.gmtime(remaining)) if remaining < 86400 else f"{remaining / 3600:.0f}h"
    terms = " ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in m.items()
                     if k.startswith("decoder/delta_r") or k == "decoder/objective")
    coding = "".join(f" {label}={m[key]:.2f}" for key, label in PROGRESS_CODING if key in m)
    lost = m.get(N.LOST_SAMPLES, 0.0)
    losses = f" | LOST {lost:,.0f} samples to damaged shards (cscctrl verify)" if lost else ""
    return (f"[cscctrl] step {step}/{total} | {ips:,.0f} img/s | {terms} | psnr={m.get(N.RECON_PSNR, 0):.2f} dB"
            f"{coding} | data wait {100 * m.get(N.DATA_WAIT, 0):.0f}%{losses} | eta {eta}")


PROGRESS_CODING = ((N.COS_Z_ZHAT, "cos(z,ẑ)"), ("code/stage1/residual", "residual1"),
                   ("sparsity/stage1", "nonzero1"))
"""Coding measures the progress line shows when logged (pipeline/diagnostics.py): how close ẑ is to z, how
much of the image stage 1 leaves unexplained, and how sparse its code is."""
