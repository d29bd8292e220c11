"""A trained model ready to apply (`cscctrl encode`, `cscctrl reconstruct`), from wherever MODEL names it.

MODEL is one of

    models:/NAME@ALIAS, models:/NAME/VERSION, models:/<model id>     a model in the MLflow registry / store
    a folder holding an MLmodel file                                  a downloaded MLflow model
    a checkpoint folder, or a run folder (its newest intact checkpoint)
    an MLflow run id (or runs:/<id>)                                  that training run's newest checkpoint,
                                                                      else the model it logged

An MLflow model is applied through the programs pipeline/model_export.py logs: ``data/model.pt2`` (g∘f)
reconstructs, ``extra_files/features.pt2`` (f with its codes) encodes. A registered version logged before
the features program existed encodes through its source run's checkpoint instead, when that can be read.
A checkpoint is applied through the networks rebuilt from its config. Either way ``features(x)`` returns
(z, nonzero) and ``reconstruct(x)`` returns g(f(x)) for images x (b, C, S, S) in [-1, 1] (model_export's
INPUT_TEXT), in eval mode, without gradients, on ``device``.
"""
from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.export.passes import move_to_device_pass

from pipeline.evaluate import load_trained
from pipeline.model_export import FEATURES_FILE, Autoencoder, FeatureExtractor
from pipeline.tracking import logged_model_uri, tracking_uri_set_to

log = logging.getLogger(__name__)

MODEL_HELP = ("a model in the MLflow registry (models:/NAME@ALIAS, models:/NAME/VERSION), a downloaded MLflow "
              "model folder, a checkpoint or run folder (newest intact checkpoint), or an MLflow run id")


class ModelSourceError(ValueError):
    """MODEL names nothing that can be loaded; the message names it and the way out."""


@dataclass
class AppliedModel:
    """A model's two uses on batches of images, with the input it expects (image_size, in_channels)."""

    image_size: int
    in_channels: int
    description: str
    device: torch.device
    _features: Callable[[Tensor], tuple[Tensor, Tensor]] | None
    _reconstruct: Callable[[Tensor], Tensor] | None
    why_no_features: str = ""

    @property
    def can_encode(self) -> bool:
        return self._features is not None

    @torch.no_grad()
    def features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(z (b, nz), unit norm; nonzero (b, stages): the fraction of non-zero entries of each stage's code)."""
        if self._features is None:
            raise ModelSourceError(self.why_no_features)
        z, nonzero = self._features(x.to(self.device, torch.float32))
        return z.float(), nonzero.float()

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """g(f(x)), the shape of x."""
        if self._reconstruct is None:
            raise ModelSourceError(f"{self.description} cannot reconstruct")
        return self._reconstruct(x.to(self.device, torch.float32)).float()


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The options of every command that applies a trained MODEL (encode, reconstruct): where it runs and
    which MLflow store names it."""
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto = the GPU when torch sees one "
                                                    "(default auto)")
    p.add_argument("--tracking-uri", default="", help="MLflow store of MODEL when it is models:/… or a run id "
                                                      "(default: $MLFLOW_TRACKING_URI, else runs/mlflow.db here)")


def pick_device(name: str) -> torch.device:
    """'auto' = the first CUDA GPU when torch sees one, else the CPU; 'cpu', 'cuda', 'cuda:N' as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSourceError(f"--device {name}: this machine's PyTorch ({torch.__version__}) sees no CUDA device; "
                               f"use --device cpu (or auto)")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ModelSourceError(f"--device {name!r} is not a device (cpu, cuda, cuda:N or auto)") from e


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the store `cscctrl train` writes by default (runs/mlflow.db) when it
    exists here, else ''."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    default = Path("runs/mlflow.db").resolve()
    return f"sqlite:///{default}" if default.is_file() else ""


def load_applied_model(source: str, *, device: torch.device, tracking_uri: str = "",
                       need_features: bool = False) -> AppliedModel:
    """Resolve MODEL (module docstring) and load it onto ``device``. ``need_features``: fail now, naming
    why, when the model cannot encode."""
    uri = tracking_uri or default_tracking_uri()
    path = Path(source).expanduser()
    if source.startswith("models:/"):
        model = _from_mlflow_uri(source, uri, device)
    elif path.is_dir() and (path / "MLmodel").is_file():
        model = _from_model_dir(path, str(path), device, run_id="", uri=uri)
    elif path.exists():
        model = _from_checkpoint(str(path), device, uri)
    else:
        model = _from_run(source, uri, device)
    if need_features and not model.can_encode:
        raise ModelSourceError(model.why_no_features)
    return model


# ----------------------------------------------------------------------------------------------
# Checkpoints (eager networks)
# ----------------------------------------------------------------------------------------------


def _from_checkpoint(source: str, device: torch.device, uri: str = "") -> AppliedModel:
    cfg, encoder, decoder, desc = load_trained(source, uri)
    encoder, decoder = encoder.to(device).eval(), decoder.to(device).eval()
    return AppliedModel(cfg.model.image_size, cfg.model.in_channels, desc, device,
                        FeatureExtractor(encoder).eval(), Autoencoder(encoder, decoder).eval())


def _from_run(source: str, uri: str, device: torch.device) -> AppliedModel:
    """An MLflow run id: its newest checkpoint (as `cscctrl eval`), else the model the run logged."""
    if not uri:
        raise ModelSourceError(f"MODEL {source!r} is not a file or folder here, and no MLflow store is known to look "
                               f"it up as a run id: pass --tracking-uri (or set MLFLOW_TRACKING_URI)")
    try:
        return _from_checkpoint(source, device, uri)
    except (FileNotFoundError, ValueError) as e:  # ValueError: damaged checkpoints, or not a cscctrl run
        if "neither a checkpoint path nor an MLflow run id" in str(e):
            raise ModelSourceError(f"MODEL {source!r}: no such file or folder, and no MLflow run of that id at "
                                   f"{uri}. MODEL is {MODEL_HELP}.") from e
        checkpoint_error = e
    from mlflow import MlflowClient

    run_id = source.removeprefix("runs:/").split("/")[0]
    try:
        model_uri = logged_model_uri(MlflowClient(uri), run_id)
    except RuntimeError as e:
        raise ModelSourceError(f"MODEL {source!r}: the run's checkpoints cannot be read ({checkpoint_error}) and "
                               f"{e}") from e
    log.info("run %s: checkpoints unreadable (%s); using the model it logged, %s", run_id, checkpoint_error,
             model_uri)
    return _from_mlflow_uri(model_uri, uri, device)


# ----------------------------------------------------------------------------------------------
# MLflow models (torch.export programs)
# ----------------------------------------------------------------------------------------------


def _from_mlflow_uri(source: str, uri: str, device: torch.device) -> AppliedModel:
    import mlflow
    from mlflow.exceptions import MlflowException

    if not uri:
        raise ModelSourceError(f"MODEL {source!r} is in an MLflow store, but none is named: pass --tracking-uri "
                               f"(e.g. sqlite:///$PWD/runs/demo/mlflow.db) or set MLFLOW_TRACKING_URI")
    try:
        with tracking_uri_set_to(uri):
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source))
            run_id = _source_run_id(source, uri)
    except MlflowException as e:
        raise ModelSourceError(f"MODEL {source}: not found in the MLflow store {uri} ({_first_line(e)}). Check the "
                               f"name and alias (the UI's Models page), or --tracking-uri") from e
    return _from_model_dir(local, source, device, run_id=run_id, uri=uri)


def _source_run_id(source: str, uri: str) -> str:
    """The training run that logged the model a models:/ URI names ('' when it cannot be told)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    ref = source.removeprefix("models:/").rstrip("/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return client.get_model_version_by_alias(name, alias).run_id or ""
        if "/" in ref:
            name, version = ref.split("/", 1)
            return client.get_model_version(name, version).run_id or ""
        return client.get_logged_model(ref).source_run_id or ""
    except Exception:  # only the fallback for old versions needs it
        return ""


def _from_model_dir(local: Path, source: str, device: torch.device, *, run_id: str, uri: str) -> AppliedModel:
    """A model folder as pipeline/model_export.py logs it."""
    from mlflow.models import Model

    mlmodel = Model.load(str(local / "MLmodel"))
    flavor = mlmodel.flavors.get("pytorch")
    if flavor is None:
        raise ModelSourceError(f"MODEL {source}: not a PyTorch model (its flavors: {', '.join(mlmodel.flavors)})")
    program = local / flavor.get("model_data", "data") / "model.pt2"
    if not program.is_file():
        raise ModelSourceError(f"MODEL {source}: no torch.export program {program.relative_to(local)} in it (it was "
                               f"not logged by `cscctrl train`)")
    image_size, in_channels = _input_shape(mlmodel, source)
    reconstruct = _program(program, device)
    features_path = local / (mlmodel.metadata or {}).get("features_file", f"extra_files/{FEATURES_FILE}")
    version = f"{source}{f' (run {run_id})' if run_id else ''}"
    if features_path.is_file():
        return AppliedModel(image_size, in_channels, version, device, _program(features_path, device), reconstruct)
    why = (f"MODEL {source} holds no features program ({features_path.relative_to(local)}: it was logged before "
           f"`cscctrl encode` existed)")
    if run_id:
        try:  # the encoder of its source run's checkpoint, the same networks the model was exported from
            trained = _from_checkpoint(run_id, device, uri)
            log.warning("%s; encoding with the networks of its run's checkpoint, %s", why, trained.description)
            return AppliedModel(image_size, in_channels, f"{version} via {trained.description}", device,
                                trained._features, reconstruct)
        except Exception as e:
            why += f", and its run's checkpoint cannot be read ({_first_line(e)})"
    return AppliedModel(image_size, in_channels, version, device, None, reconstruct,
                        why_no_features=f"{why}. Encode from the run's checkpoint folder, or train and register the "
                                        f"model again with this version of cscctrl.")


def _input_shape(mlmodel: Any, source: str) -> tuple[int, int]:
    """(image_size, in_channels) from the model's metadata, else from its signature's input (-1, C, S, S)."""
    meta = mlmodel.metadata or {}
    if "image_size" in meta and "in_channels" in meta:
        return int(meta["image_size"]), int(meta["in_channels"])
    try:
        shape = mlmodel.signature.inputs.inputs[0].shape
        if len(shape) == 4 and shape[1] > 0 and shape[2] == shape[3] > 0:
            return int(shape[2]), int(shape[1])
    except (AttributeError, IndexError, TypeError):
        pass
    raise ModelSourceError(f"MODEL {source}: its metadata and signature do not say the image size and channels it "
                           f"takes (not a model logged by `cscctrl train`)")


def _program(path: Path, device: torch.device) -> Callable[..., Any]:
    """A torch.export program as a callable on ``device`` (moved by torch.export's own device pass)."""
    program = torch.export.load(str(path))
    if device.type != "cpu":
        program = move_to_device_pass(program, device)
    return program.module()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
