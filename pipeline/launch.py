"""`cscctrl train`: resolve the config, check everything that can be checked, then fit a Ray TorchTrainer.

    cscctrl train [-c CONFIG.yaml] [section.key=value ...]

Connects to the Ray cluster named by RAY_ADDRESS (set inside `ray job submit`), else starts a local one. The same run name resumes from its last checkpoint in run.storage_path.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint import repair_run
from pipeline.cli import invocation
from pipeline.config import ConfigError, ExperimentConfig, dump_yaml, load_config
from pipeline.content_hash import config_identity, content_hash
from pipeline.ray_init import init_ray
from pipeline.resume import check_resume
from pipeline.sizes import check_worker_memory, host_memory_bytes
from pipeline.tracking import check_reachable, resolve_tracking_uri
from pipeline.worker import train_loop_per_worker
from sharding.ensure import demo_plan, demo_shards_url, ensure_demo_shards, existing_manifest, num_classes_in
from sharding.manifest import ManifestError, read_manifest
from sharding.storage import is_url

log = logging.getLogger(__name__)

HELP_EPILOG = """\
examples:
  cscctrl train                                   # demo shards, 1 CPU worker, local MLflow store
  cscctrl train -c configs/fashion_mnist32.yaml data.shards=/data/fmnist-shards scaling.num_workers=2
  cscctrl train -c imagenet128 data.shards=s3://bucket/imagenet-128 run.storage_path=s3://bucket/runs
      # on a cluster: `ray job submit ... -- cscctrl train ...`; MLflow comes from $MLFLOW_TRACKING_URI
  cscctrl train --print-config model.preset=csc_ctrl_48    # show the resolved config and exit

Overrides are section.key=value with sections model, objective, optim, train, data, run, tracking,
scaling; values are Python/YAML literals (3e-4, true, [0.0, 0.9], csc_ctrl_128). Precedence:
defaults < model.preset < YAML file < overrides. Every key is documented in pipeline/config.py.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = HELP_EPILOG
    p.add_argument("-c", "--config", help="YAML file (or the name of one in configs/) holding only what "
                                          "differs from the defaults")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        cfg = resolve_run_config(cfg)
    except (ConfigError, FileNotFoundError, ConnectionError, ValueError) as e:
        print(f"cscctrl train: error: {e}", file=sys.stderr)
        return 2
    result = run_training(cfg)
    return 0 if result is not None else 1


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a finished training run left: its name, its folder under run.storage_path, its last checkpoint."""

    run_name: str
    run_dir: str
    checkpoint: str
    """The newest checkpoint's path ('' when the run reported none)."""

    steps: int


def default_run_name(cfg: ExperimentConfig) -> str:
    """Content-based: the same config gives the same name (so re-running resumes); no timestamps."""
    return f"ctrl-{cfg.model.image_size}px-{cfg.objective.mode}-{content_hash(config_identity(cfg))}"


def resolve_run_config(cfg: ExperimentConfig, dry_run: bool = False) -> ExperimentConfig:
    """Fill what the workers must agree on (run name, absolute storage, tracking URI, class count) and
    fail here, before any worker starts, on anything that would fail later. ``dry_run`` (a plan print)
    writes nothing: default demo shards that do not exist yet are planned, not written, and the default
    MLflow store's folder is not created."""
    run, data, tracking, objective = cfg.run, cfg.data, cfg.tracking, cfg.objective
    storage = run.storage_path if is_url(run.storage_path) else str(Path(run.storage_path).expanduser().resolve())
    run = dataclasses.replace(run, storage_path=storage)
    cfg = dataclasses.replace(cfg, run=run)
    if not data.synthetic:
        planned = None
        if not data.shards:
            if dry_run and existing_manifest(demo_shards_url(storage)) is None:
                planned = demo_plan()
                data = dataclasses.replace(data, shards=demo_shards_url(storage))
            else:
                data = dataclasses.replace(data, shards=ensure_demo_shards(storage))
        if planned is None:
            manifest = check_shards(data.shards, data.train_split, cfg.model.image_size, data.eval_split)
        if objective.mode == "multiclass" and not objective.num_classes:
            classes = manifest.num_classes_in(data.train_split) if planned is None else \
                num_classes_in(planned, data.train_split)
            objective = dataclasses.replace(objective, num_classes=classes)
    if objective.mode == "multiclass" and objective.num_classes < 2:
        raise ConfigError(f"objective.mode=multiclass needs at least 2 classes; got {objective.num_classes}")
    cfg = dataclasses.replace(cfg, data=data, objective=objective)
    uri = resolve_tracking_uri(cfg, create=not dry_run)
    check_reachable(uri)
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(tracking, uri=uri))
    if not run.name:
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(run, name=default_run_name(cfg)))
    if cfg.scaling.num_workers == 0 and cfg.scaling.use_gpu and not torch.cuda.is_available():
        raise ConfigError(f"scaling.use_gpu=true with scaling.num_workers=0 trains in this process, but its "
                          f"PyTorch ({torch.__version__}) sees no CUDA device; set scaling.use_gpu=false")
    if cfg.scaling.num_workers == 0 or not os.environ.get("RAY_ADDRESS"):  # the workers run on this machine
        check_worker_memory(cfg, host_memory_bytes())
    check_resume(cfg)
    return cfg


def check_shards(url: str, split: str, image_size: int, eval_split: str = "") -> Any:
    """The manifest must exist and hold samples of the training split (and of the evaluation split, when it
    lists one); returns it."""
    try:
        manifest = read_manifest(url)
    except ManifestError as e:
        if "no manifest.json" not in str(e):
            raise ConfigError(f"data.shards={url!r}: {e}") from e
        raise FileNotFoundError(f"data.shards={url!r}: no shard manifest there ({e}). Write shards first: "
                                f"cscctrl shard SOURCE {url}") from e
    except FileNotFoundError as e:
        raise FileNotFoundError(f"data.shards={url!r}: no shard manifest there ({e}). Write shards first: "
                                f"cscctrl shard SOURCE {url}") from e
    if split not in manifest.splits:
        raise ConfigError(f"data.train_split={split!r} is not in {url} (splits: {', '.join(manifest.splits)})")
    for key, name in (("data.train_split", split), ("data.eval_split", eval_split)):
        if name in manifest.splits and manifest.num_samples(name) == 0:
            other = [s for s in manifest.splits if manifest.num_samples(s) > 0]
            way_out = "set data.eval_split='' to skip the evaluation, or " if key == "data.eval_split" else ""
            raise ConfigError(f"{key}={name!r} holds no samples in {url} (every image of it was rejected or "
                              f"none was listed; see manifest/rejected.parquet): {way_out}choose a split with "
                              f"samples ({', '.join(other) or 'none'}) or shard the source again")
    return manifest


def ray_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """Start or join Ray; check the cluster can ever hold the worker group (else Ray waits forever)."""
    import ray

    init_ray()
    total = ray.cluster_resources()
    s = cfg.scaling
    need_cpu = s.num_workers * s.cpus_per_worker
    need_gpu = s.num_workers * s.gpus_per_worker if s.use_gpu else 0
    if os.environ.get("RAY_ADDRESS"):  # a cluster: no node may be too small for one worker
        largest = max((n.get("Resources", {}).get("memory", 0) for n in ray.nodes() if n.get("Alive")), default=0)
        check_worker_memory(cfg, int(largest), "the largest node of the Ray cluster")
    if need_cpu > total.get("CPU", 0) or need_gpu > total.get("GPU", 0):
        raise ConfigError(
            f"scaling asks for {s.num_workers} workers × ({s.cpus_per_worker} CPU"
            f"{f', {s.gpus_per_worker} GPU' if s.use_gpu else ''}) = {need_cpu:g} CPU, {need_gpu:g} GPU, but the "
            f"Ray cluster has {total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU. Lower scaling.num_workers "
            f"or scaling.cpus_per_worker, or add nodes.")
    return total


def with_command(cfg: ExperimentConfig) -> ExperimentConfig:
    """cfg with tracking.command set to the command line that runs it (pipeline/cli.py ``invocation``),
    unless it names one already. The run's MLflow description shows it."""
    if cfg.tracking.command:
        return cfg

    return dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, command=invocation()))


def build_trainer(cfg: ExperimentConfig, callbacks: list[Any] | None = None) -> Any:
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = with_command(cfg)  # a sweep's trials come with the sweep's command (tuning/sweep.py)
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                               resources_per_worker=resources,
                                               placement_strategy=s.placement_strategy,
                                               accelerator_type=s.accelerator_type or None),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=s.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
            callbacks=callbacks or None,
        ),
    )


def run_training(cfg: ExperimentConfig, callbacks: list[Any] | None = None) -> TrainResult | None:
    """Fit the run described by a resolved config (``resolve_run_config``); returns what it left, or None
    when training failed    (the error is printed, naming what failed)."""
    import ray.train

    if cfg.scaling.num_workers > 0:
        ray_resources(cfg)
    repair_checkpoints(cfg)
    print(f"[cscctrl] run {cfg.run.name}: {max(1, cfg.scaling.num_workers)} worker(s) × batch "
          f"{cfg.train.batch_size_per_worker}, {cfg.train.steps} steps, storage {cfg.run.storage_path}, "
          f"MLflow {cfg.tracking.uri} (experiment '{cfg.tracking.experiment}')", flush=True)
    try:
        result = build_trainer(cfg, callbacks).fit()
    except ray.train.TrainingFailedError as e:
        print(f"cscctrl train: training failed: {root_cause(e)}", file=sys.stderr)
        return None
    print(f"[cscctrl] finished {cfg.run.name}; checkpoint: {result.checkpoint.path if result.checkpoint else '-'}",
          flush=True)
    run_dir = f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}"
    # Ray's checkpoint path has no scheme on object stores: the URL is the run folder's plus the folder name.
    checkpoint = f"{run_dir}/{result.checkpoint.path.rstrip('/').rsplit('/', 1)[-1]}" if result.checkpoint else ""
    return TrainResult(run_name=cfg.run.name, run_dir=run_dir, checkpoint=checkpoint, steps=cfg.train.steps)


def repair_checkpoints(cfg: ExperimentConfig) -> None:
    """Before a run (re)starts: damaged checkpoints newer than the newest intact one are moved aside and
    Ray Train's record of the run is made to match the folders present (pipeline/checkpoint.py
    ``repair_run``), so the run resumes from its newest intact checkpoint; what was done is printed."""
    repair = repair_run(f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}")
    for line in repair.messages(cfg.run.name):
        print(line, flush=True)


def root_cause(e: BaseException) -> str:
    """The innermost error message of a Ray failure (worker tracebacks are long)."""
    seen = e
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    return text[-1] if text else repr(seen)
