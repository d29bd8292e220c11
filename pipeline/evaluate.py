"""Evaluation of a trained CSC-CTRL autoencoder, and `cscctrl eval`.

    cscctrl eval CHECKPOINT_OR_RUN [--data SHARDS_URL] [--split val] [--out DIR]

On an exact, non-resampled pass over a shard split: reconstruction MSE / PSNR / SSIM of g(f(x)) (the
standard SSIM, of the images mapped to [0, 1] with data range 1: metrics.ssim_signed_unit), per-stage
sparsity, residual and stage-1 PSNR of the codes and the atoms' roughness and drift from their
initialisation (pipeline/diagnostics.py), the mean cos(z, ẑ), the ΔR terms on the whole evaluation set (Gram statistics summed over batches),
feature quality where labels exist (k-NN and nearest-subspace accuracy with the training split as
reference), and FD-EffNetLite0 / KID between real and reconstructed images (a Fréchet distance on
EfficientNet-Lite0 features that ship in a package: named for what it is, not "FID"). Images have the
model's in_channels: 3 (RGB) or 1 (grey; the feature networks see it replicated to RGB).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import build_models
from models.ctrl import CTRLStats, ctrl_objective, ctrl_statistics
from pipeline import metric_names as N
from pipeline import metrics as M
from pipeline.checkpoint import load_newest
from pipeline.config import ExperimentConfig
from pipeline.datasets import dataset_input, shard_dataset
from pipeline.diagnostics import atom_measures, first_stage_weight, initial_dictionaries, stage_measures
from pipeline.features import EffNetLite0Features
from pipeline.pictures import atom_tiles, luminance, recon_grid
from pipeline.report import REPORT_FILE, write_report
from pipeline.tracking import RUN_NAME_TAG, existing_store_uri, find_run
from sharding.manifest import read_manifest
from sharding.storage import Destination, is_url
from sharding.stream import describe_losses, make_eval_loader

log = logging.getLogger(__name__)

GRID_IMAGES = 32  # images in a real-vs-reconstruction grid
ITEM_MATCH_IMAGES = 1000  # images among which a reconstruction must find its own input (metrics.item_match)
ITEM_MATCH_SIDE = 32  # pixels: larger images are average-pooled to this side for item_match


def _small(x: Tensor) -> Tensor:
    """x at most ITEM_MATCH_SIDE pixels a side (adaptive average pooling), for item_match's distances."""
    return F.adaptive_avg_pool2d(x, ITEM_MATCH_SIDE) if max(x.shape[-2:]) > ITEM_MATCH_SIDE else x


# ----------------------------------------------------------------------------------------------
# Pictures during training (rank 0)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def training_images(trainer: Any, x: Tensor) -> dict[str, Any]:
    """Real-vs-reconstruction grid and the stage-1 dictionary atoms (pixel space) of the encoder (its
    filters for the plain-convolution baseline), and for colour models their luminance.
    Run in eval mode (running BN statistics: no collective, safe on rank 0 alone)."""
    enc, dec = trainer.raw_encoder, trainer.raw_decoder
    was_training = enc.training, dec.training
    enc.eval(), dec.eval()
    try:
        xs = x[:GRID_IMAGES].float()
        x_hat = dec(enc(xs)).float()
    finally:
        enc.train(was_training[0]), dec.train(was_training[1])
    atoms = first_stage_weight(enc).detach().float().cpu()
    images = {"recon": recon_grid(xs.cpu(), x_hat.cpu()), "atoms_stage1": atom_tiles(atoms)}
    if atoms.shape[1] == 3:
        images["atoms_stage1_luma"] = atom_tiles(luminance(atoms))
    return images


# ----------------------------------------------------------------------------------------------
# The evaluation pass
# ----------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    metrics: dict[str, float]
    features: Tensor | None = None   # (n, d) z of every evaluated image
    labels: Tensor | None = None     # (n,)
    sparsity_per_atom: list[Tensor] = field(default_factory=list)  # per stage (M,) fractions
    example: tuple[Tensor, Tensor] | None = None  # (x, x_hat) of the first batch, CPU


@torch.no_grad()
def evaluate_model(encoder: nn.Module, decoder: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *,
                   device: torch.device, mode: str, num_classes: int, eps_sq: float,
                   max_batches: int = 0, keep_features: bool = False,
                   fd_features: Any = None, initial_atoms: list[Tensor] | None = None) -> EvalResult:
    """One exact pass (or ``max_batches`` batches) in eval mode. The ΔR terms are those of the whole
    evaluated set: per-batch Gram statistics are summed, then the logdets are taken once. The coding
    measures of pipeline/diagnostics.py (residual and stage-1 PSNR per image batch, weighted by its size;
    the atoms' roughness and, with ``initial_atoms``, drift), the mean cos(z, ẑ), and ``item_match``: the
share of the first ITEM_MATCH_IMAGES reconstructions nearest to their own input (the same item, not
another of its class)."""
    encoder.eval(), decoder.eval()
    k = num_classes if mode == "multiclass" else 1
    sums: dict[str, float] = {"mse": 0.0, "psnr": 0.0, "ssim": 0.0, "cos_z_zhat": 0.0}
    coding: dict[str, float] = {}
    item_real: list[Tensor] = []
    item_recon: list[Tensor] = []
    n_images = 0
    stats: CTRLStats | None = None
    code_nonzero: list[Tensor] = []
    code_total = 0
    feats, labs = [], []
    real_f, recon_f = [], []
    example = None
    for i, (x, labels) in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        x, labels = x.to(device).float(), labels.to(device)
        z, codes, inputs = encoder.forward_stages(x)
        x_hat = decoder(z).float()
        z_hat = encoder(x_hat)
        b = x.shape[0]
        n_images += b
        sums["mse"] += M.mse(x, x_hat, reduction="none").sum().item()
        sums["psnr"] += M.psnr(x, x_hat, reduction="none").clamp(max=100.0).sum().item()
        sums["ssim"] += M.ssim_signed_unit(x, x_hat, reduction="none").sum().item()
        sums["cos_z_zhat"] += torch.nn.functional.cosine_similarity(z.float(), z_hat.float(), dim=1).sum().item()
        for name, v in stage_measures(encoder, x, codes, inputs).items():
            if not name.startswith("sparsity/"):  # per-atom usage below gives the exact sparsity
                coding[name] = coding.get(name, 0.0) + float(v) * b
        s = ctrl_statistics(z, z_hat, labels.clamp(0, k - 1) if k > 1 else labels, k, mode)
        stats = s if stats is None else CTRLStats.from_flat(stats.to_flat() + s.to_flat(), k, z.shape[1])
        usage = [M.atom_usage(c).mul(b) for c in codes]
        code_nonzero = usage if not code_nonzero else [a + u for a, u in zip(code_nonzero, usage)]
        code_total += b
        if keep_features:
            feats.append(z.float().cpu())
            labs.append(labels.cpu())
        if fd_features is not None:
            real_f.append(fd_features(x).cpu())
            recon_f.append(fd_features(x_hat).cpu())
        if example is None:
            example = (x[:GRID_IMAGES].cpu(), x_hat[:GRID_IMAGES].cpu())
        if sum(len(t) for t in item_real) < ITEM_MATCH_IMAGES:
            item_real.append(_small(x).cpu())
            item_recon.append(_small(x_hat).cpu())
    if n_images == 0:
        raise ValueError("the evaluation data yielded no images")
    metrics = {k_: v / n_images for k_, v in sums.items()}
    metrics["item_match"] = float(M.item_match(torch.cat(item_real)[:ITEM_MATCH_IMAGES],
                                               torch.cat(item_recon)[:ITEM_MATCH_IMAGES]))
    metrics.update({k_: v / n_images for k_, v in coding.items()})
    metrics.update({k_: float(v) for k_, v in atom_measures(encoder, initial_atoms).items()})
    per_atom = [c / code_total for c in code_nonzero]
    for j, u in enumerate(per_atom):
        metrics[f"sparsity/stage{j + 1}"] = float(u.mean())
    terms = ctrl_objective(stats, mode, eps_sq)
    metrics.update({f"objective/{name}": float(v) for name, v in terms.as_dict().items()})
    metrics["images"] = float(n_images)
    if fd_features is not None:
        a, b_ = torch.cat(real_f).numpy(), torch.cat(recon_f).numpy()
        metrics["fd_effnetlite0"] = M.frechet_distance(a, b_)
        kid = M.kid(a, b_, subsets=10, subset_size=min(1000, len(a)))
        metrics["kid_effnetlite0"] = kid.mean
    return EvalResult(metrics=metrics,
                      features=torch.cat(feats) if feats else None,
                      labels=torch.cat(labs) if labs else None,
                      sparsity_per_atom=[u.cpu() for u in per_atom], example=example)


def feature_accuracy(train: EvalResult, test: EvalResult, num_classes: int) -> dict[str, float]:
    """k-NN and nearest-subspace accuracy of z (train features as the reference set)."""
    if train.features is None or test.features is None:
        return {}
    if not set(test.labels.unique().tolist()) <= set(train.labels.unique().tolist()):
        return {}  # classes never seen in the reference split (e.g. the demo's unseen photos)
    k = min(20, len(train.features))
    r = max(1, min(train.features.shape[1] // max(1, num_classes), 12))
    return {
        "knn_accuracy": M.knn_accuracy(train.features, train.labels, test.features, test.labels, k=k),
        "nearest_subspace_accuracy": M.nearest_subspace_accuracy(train.features, train.labels, test.features,
                                                                 test.labels, n_components=r),
    }


def evaluate_at_end(cfg: ExperimentConfig, trainer: Any, tracker: Any) -> dict[str, float]:
    """The end-of-training evaluation on data.eval_split (rank 0; a bounded number of batches)."""
    if not cfg.train.eval_batches or not cfg.data.eval_split or cfg.data.synthetic:
        return {}

    if cfg.data.eval_split not in read_manifest(cfg.data.shards).splits:
        log.warning("no '%s' split in %s: skipping the end-of-training evaluation", cfg.data.eval_split,
                    cfg.data.shards)
        return {}
    loader = make_eval_loader(cfg.data.shards, split=cfg.data.eval_split, image_size=cfg.model.image_size,
                              batch_size=cfg.train.batch_size_per_worker, num_workers=0, rank=0, world_size=1,
                              channels=cfg.model.in_channels)
    result = evaluate_model(trainer.raw_encoder, trainer.raw_decoder, loader, device=trainer.device,
                            mode=cfg.objective.mode, num_classes=trainer.num_classes,
                            eps_sq=cfg.objective.eps_sq, max_batches=cfg.train.eval_batches,
                            initial_atoms=trainer.initial_atoms)
    trainer.raw_encoder.train(), trainer.raw_decoder.train()
    out = {N.EVAL_PREFIX + k: v for k, v in result.metrics.items()}
    out[N.EVAL_PREFIX + "lost_samples"] = float(loader.stats.lost_samples)
    tracker.log_metrics(trainer.step, out)
    if result.example is not None:
        tracker.log_image(recon_grid(*result.example), f"eval/{cfg.data.eval_split}_recon.png")
    print("[cscctrl] eval on '{}': psnr {:.2f} dB, ssim {:.3f}, mse {:.4f}".format(
        cfg.data.eval_split, out[N.EVAL_PREFIX + "psnr"], out[N.EVAL_PREFIX + "ssim"], out[N.EVAL_PREFIX + "mse"]),
        flush=True)
    return out


# ----------------------------------------------------------------------------------------------
# Loading a trained model
# ----------------------------------------------------------------------------------------------


def load_trained(source: str, tracking_uri: str = "") -> tuple[ExperimentConfig, nn.Module, nn.Module, str]:
    """A checkpoint directory, a Ray run directory (newest checkpoint), either local or an fsspec URL
    (s3://…), or an MLflow run id whose training run name leads to its checkpoints. Returns (config,
    encoder, decoder, description)."""
    path: str | Path = source if is_url(source) else Path(source).expanduser()
    if not is_url(source) and not Path(path).exists():
        path = _checkpoint_of_mlflow_run(source, tracking_uri)
    latest, state = load_newest(path)  # the newest intact checkpoint; damaged ones are named
    if "config" not in state or "encoder" not in state:
        raise ValueError(f"{latest} is not a cscctrl checkpoint (no config / encoder in it)")
    cfg = ExperimentConfig.from_dict(state["config"])
    encoder, decoder = build_models(cfg.model)
    try:
        encoder.load_state_dict(state["encoder"])
        decoder.load_state_dict(state["decoder"])
    except RuntimeError as e:
        raise ValueError(f"{latest}: the checkpoint does not match the architecture in its config "
                         f"(model.layer={cfg.model.layer}): {str(e).splitlines()[0]}") from e
    return cfg, encoder, decoder, f"{latest} (step {state['step']})"


def _checkpoint_of_mlflow_run(run_id: str, tracking_uri: str) -> str:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(existing_store_uri(tracking_uri, f"{run_id!r} is neither a checkpoint path nor an MLflow run id"))
    try:
        run = client.get_run(run_id.removeprefix("runs:/").split("/")[0])
    except MlflowException as e:
        raise FileNotFoundError(f"{run_id!r} is neither a checkpoint path nor an MLflow run id "
                                f"at {client.tracking_uri}") from e
    params = run.data.params
    name = run.data.tags.get(RUN_NAME_TAG)
    storage = params.get("run.storage_path")
    if not name or not storage:
        raise ValueError(f"MLflow run {run_id} was not written by `cscctrl train` (no run name tag)")
    return f"{storage.rstrip('/')}/{name}"   # a local path or a URL (never Path: it would fold s3:// to s3:/)


# ----------------------------------------------------------------------------------------------
# `cscctrl eval`
# ----------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="CHECKPOINT_OR_RUN",
                   help="checkpoint directory, Ray run directory (newest checkpoint), or MLflow run id")
    p.add_argument("--data", default="", help="shard set to evaluate on (default: the one trained on); "
                                              "another shard set measures generalisation")
    p.add_argument("--split", default="val", help="split of --data to evaluate (default: val)")
    p.add_argument("--reference-split", default="train",
                   help="split whose features are the k-NN / nearest-subspace reference (default: train)")
    p.add_argument("--max-batches", type=int, default=0, help="stop after this many batches (0 = all)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--no-fd", action="store_true", help="skip FD-EffNetLite0 / KID (slow on CPU)")
    p.add_argument("--out", default="", help="directory for the report (default: <run dir>/eval-<split>)")
    p.add_argument("--tracking-uri", default="", help="MLflow store to log to (default: the run's)")
    p.add_argument("--allow-lost-samples", action="store_true",
                   help="exit 0 when the exact pass could not read every sample the manifest lists (damaged "
                        "shards); the report and a warning still say how many were lost (default: exit 1)")


def main(args: argparse.Namespace) -> int:
    try:
        return _main(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"cscctrl eval: error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    report = evaluate_checkpoint(args.source, data=args.data, split=args.split, reference_split=args.reference_split,
                                 max_batches=args.max_batches, batch_size=args.batch_size, device=args.device,
                                 fd=not args.no_fd, out=args.out, tracking_uri=args.tracking_uri)
    print(json.dumps(report.to_dict(), indent=2))
    print(f"[cscctrl] report: {report.path}")
    if report.lost_samples:
        allowed = getattr(args, "allow_lost_samples", False)
        print(f"cscctrl eval: {'WARNING' if allowed else 'error'}: {report.losses_text()}"
              f"{'' if allowed else ' (--allow-lost-samples accepts the incomplete evaluation)'}", file=sys.stderr)
        return 0 if allowed else 1
    return 0


@dataclass(frozen=True)
class EvalReport:
    """One evaluation of a trained model on one split (the report's metrics.json, typed)."""

    model: str
    layer: str
    trained_on: str
    evaluated_on: str
    generalisation: bool
    metrics: dict[str, float]
    samples: dict[str, Any] | None
    """Sample accounting of an exact pass (sharding/stream.py); None when max_batches cut it short."""

    out: str
    """The report's folder (a path or a URL)."""

    path: str
    """Its report.html."""

    @property
    def lost_samples(self) -> int:
        return int(self.samples["lost"]) if self.samples else 0

    def losses_text(self) -> str:
        return describe_losses(self.samples, self.evaluated_on) if self.samples else ""

    def to_dict(self) -> dict[str, Any]:
        d = {"model": self.model, "layer": self.layer, "trained_on": self.trained_on,
             "evaluated_on": self.evaluated_on, "generalisation": self.generalisation, "metrics": self.metrics}
        if self.samples is not None:
            d["samples"] = self.samples
        return d


def evaluate_checkpoint(source: str, *, data: str = "", split: str = "val", reference_split: str = "train",
                        max_batches: int = 0, batch_size: int = 256, device: str = "auto", fd: bool = True,
                        out: str = "", tracking_uri: str = "") -> EvalReport:
    """Evaluate the model of ``source`` (checkpoint, Ray run directory or MLflow run id) on ``split`` of
    ``data`` (default: the shards it trained on); write the report under ``out`` (a path or URL; default
    <run dir>/eval-<split>) and attach it to the training run's MLflow run when there is one."""
    cfg, encoder, decoder, desc = load_trained(source, tracking_uri)
    data_url = data or cfg.data.shards
    manifest = read_manifest(data_url)
    if split not in manifest.splits:
        raise ValueError(f"split {split!r} not in {data_url} (splits: {', '.join(manifest.splits)})")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine's PyTorch ({torch.__version__}) sees no CUDA device; "
                         f"use --device cpu (or auto)")
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    encoder.to(dev), decoder.to(dev)
    fd_features = EffNetLite0Features(dev) if fd else None

    def loader(name: str) -> Any:
        return make_eval_loader(data_url, split=name, image_size=cfg.model.image_size, batch_size=batch_size,
                                num_workers=0, rank=0, world_size=1, channels=cfg.model.in_channels)

    k = cfg.objective.num_classes if cfg.objective.mode == "multiclass" else 1
    common = dict(device=dev, mode=cfg.objective.mode, num_classes=k, eps_sq=cfg.objective.eps_sq,
                  max_batches=max_batches)
    labelled = manifest.num_classes > 1
    initial = [w.to(dev) for w in initial_dictionaries(cfg.model, cfg.run.seed)]
    test_loader = loader(split)
    test = evaluate_model(encoder, decoder, test_loader, keep_features=labelled, fd_features=fd_features,
                          initial_atoms=initial, **common)
    metrics = dict(test.metrics)
    metrics["lost_samples"] = float(test_loader.stats.lost_samples)  # sharding/stream.py: sample accounting
    samples = test_loader.account(int(test.metrics["images"])) if not max_batches else None
    if labelled and reference_split in manifest.splits and reference_split != split:
        ref = evaluate_model(encoder, decoder, loader(reference_split), keep_features=True, **common)
        metrics.update(feature_accuracy(ref, test, manifest.num_classes))
    trained_on = cfg.data.shards
    report = {"model": desc, "layer": cfg.model.layer, "trained_on": trained_on,
              "evaluated_on": f"{data_url} [{split}]",
              "generalisation": data_url != trained_on, "metrics": metrics}
    if samples is not None:  # an exact pass: every sample the manifest lists was read or is counted as lost
        metrics["lost_samples"] = float(samples["lost"])
        report["samples"] = samples
    out = out or f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}/eval-{split}"
    run = training_run(cfg, tracking_uri or cfg.tracking.uri)
    with report_folder(out) as (folder, publish):
        write_report(folder, report, encoder, decoder, test, cfg, history=training_history(*run) if run else None)
        path = publish()
        if run:
            _log_eval_to_mlflow(*run, data, split, report, folder,
                                shard_dataset(data_url, split, "evaluation", manifest))
    return EvalReport(model=desc, layer=cfg.model.layer, trained_on=trained_on, evaluated_on=report["evaluated_on"],
                      generalisation=report["generalisation"], metrics=metrics, samples=samples, out=out, path=path)


@contextlib.contextmanager
def report_folder(out: str) -> Iterator[tuple[Path, Callable[[], str]]]:
    """(local folder to write the report in, publish() -> where report.html is). A local ``out`` is that
    folder itself; a URL (s3://…) gets a temporary folder whose files publish() uploads through the
    project's fsspec layer (sharding/storage.py), each file atomically."""
    if not is_url(out):
        folder = Path(out).expanduser()
        yield folder, lambda: str(folder / REPORT_FILE)
        return
    dest = Destination(out)
    with tempfile.TemporaryDirectory(prefix="cscctrl-eval-") as tmp:
        def publish() -> str:
            dest.makedirs()
            dest.upload_folder(tmp)
            return dest.url_of(REPORT_FILE)

        yield Path(tmp), publish


def training_run(cfg: ExperimentConfig, uri: str) -> tuple[Any, str] | None:
    """(MlflowClient, run id) of the training run named cfg.run.name in its MLflow store, or None when
    there is no store, no such run, or the store cannot be reached (logged: the report on disk is the
    primary output, so the curves and the MLflow copy of the evaluation are then skipped)."""
    if not uri:
        return None
    from mlflow import MlflowClient

    try:
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        run_id = find_run(client, experiment.experiment_id, cfg.run.name) if experiment else None
    except Exception as e:
        log.warning("MLflow at %s cannot be read (%s): no training curves, evaluation not logged there", uri, e)
        return None
    return (client, run_id) if run_id else None


def training_history(client: Any, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), …]} of the N.HISTORY_METRICS the run logged; {} when they cannot be read
    (the report then has no curves, and says nothing false)."""
    try:
        history = {}
        for key in N.HISTORY_METRICS:
            points = sorted({(m.step, m.value) for m in client.get_metric_history(run_id, key)})
            if points:
                history[key] = points
        return history
    except Exception as e:  # curves are an extra: the evaluation itself must not fail on them
        log.warning("no training curves from MLflow at %s: %s", client.tracking_uri, e)
        return {}


def _log_eval_to_mlflow(client: Any, run_id: str, data: str, split: str, report: dict[str, Any],
                        out: Path, dataset: dict[str, Any]) -> None:
    """Attach the evaluation to the training run's MLflow run (metrics eval/<split>/..., report files, and
    the evaluated split as a dataset input in the context "evaluation": pipeline/datasets.py)."""
    try:
        name = Path(data).name if data else "trained-data"
        prefix = f"eval/{name}/{split}"
        for k, v in report["metrics"].items():
            client.log_metric(run_id, f"{prefix}/{k}", float(v))
        client.log_artifacts(run_id, str(out), artifact_path=prefix)
        client.log_inputs(run_id, datasets=[dataset_input(dataset)])
    except Exception as e:  # the report on disk is the primary output
        log.warning("could not log the evaluation to MLflow at %s: %s", client.tracking_uri, e)
