"""The model a training run logs to MLflow (and the registry serves), and what it holds.

One MLflow model per run, logged by ``mlflow.pytorch.log_model`` as torch.export programs (no pickled
classes of this package, so loading needs torch and MLflow only):

    data/model.pt2              g∘f (``Autoencoder``): images -> reconstructions. This is what
                                ``mlflow.pyfunc.load_model(...).predict`` and ``mlflow models predict`` run.
    extra_files/features.pt2    f with its codes (``FeatureExtractor``): images -> (z, nonzero), what
                                ``cscctrl encode`` runs (pipeline/applied_model.py).
    signature                   input and output: float32 tensors (-1, C, S, S) (C = model.in_channels,
                                S = model.image_size)
    input_example               two of the run's training images as the encoder saw them
    metadata                    ``model_metadata``: the sizes, the layer type, and in words what the input,
                                the output and the features program are

Why f travels inside the same model version, as a second program beside g∘f, rather than as a second
registered model or through the run's training checkpoint: a version then holds an encoder and a decoder
that belong together by construction; ``models:/NAME@ALIAS`` needs nothing but the registry (the
checkpoints may be deleted, or on storage the user cannot read); and pyfunc keeps a single tensor output,
the reconstruction, which is what MLflow's PyTorch flavor can serve.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.export import Dim

from models.csc import CSCLayer

FEATURES_FILE = "features.pt2"
"""File name of the features program among the model's extra files (``extra_files/features.pt2``)."""

INPUT_TEXT = ("float32 images (batch, C, S, S) in [-1, 1]: pixel / 127.5 - 1 of the centre square crop "
              "resized to S x S (bicubic); C = 1: grey (ITU-R 601 luminance), C = 3: RGB")
OUTPUT_TEXT = "float32 reconstructions g(f(x)) of the same shape, in about [-1, 1]"
FEATURES_TEXT = ("extra_files/features.pt2, a torch.export program: images (as the input) -> (z (batch, nz), "
                 "unit-norm features f(x); nonzero (batch, stages), the fraction of non-zero code entries of "
                 "each CSC stage, input to output)")


class Autoencoder(nn.Module):
    """encoder f + decoder g as one module for ``mlflow.pytorch.log_model``: forward(x) = g(f(x))."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


class FeatureExtractor(nn.Module):
    """f with its codes: forward(x) = (z, nonzero), z = f(x) (b, nz) and nonzero[i, l] the fraction of
    non-zero entries of stage l's code of image i (pipeline/diagnostics.py's sparsity, per image)."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z, codes, _ = self.encoder.forward_stages(x)
        nonzero = torch.stack([(c != 0).flatten(1).float().mean(1) for c in codes], dim=1)
        return z, nonzero


def export_features(encoder: nn.Module, example: Tensor, path: str | Path) -> Path:
    """Save ``FeatureExtractor(encoder)`` as a torch.export program at ``path``, any batch size (the example
    needs 2 or more images: torch.export fixes a dimension whose example size is 0 or 1)."""
    module = FeatureExtractor(encoder).eval()
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes=({0: Dim.AUTO},))
    torch.export.save(program, str(path))
    return Path(path)


def signature(in_channels: int, image_size: int) -> Any:
    """Input and output of g∘f: float32 tensors (-1, C, S, S), unnamed (MLflow's PyTorch flavor then hands
    the array to the model as it is; a named tensor would reach it as a dict, which it refuses)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    spec = TensorSpec(np.dtype(np.float32), (-1, in_channels, image_size, image_size))
    return ModelSignature(inputs=Schema([spec]), outputs=Schema([spec]))


def model_metadata(model_cfg: Any, stages: int) -> dict[str, Any]:
    """The MLmodel ``metadata`` of a logged CSC-CTRL model (read back by pipeline/applied_model.py)."""
    return {"cscctrl_model": 1, "image_size": int(model_cfg.image_size), "in_channels": int(model_cfg.in_channels),
            "nz": int(model_cfg.nz), "stages": int(stages), "layer": str(model_cfg.layer),
            "preset": str(model_cfg.preset or ""), "features_file": f"extra_files/{FEATURES_FILE}",
            "input": INPUT_TEXT, "output": OUTPUT_TEXT, "features": FEATURES_TEXT}


def input_example(model_cfg: Any, images: Tensor | None) -> Tensor:
    """Two images (CPU, float32) for the logged example and for tracing: the first two of ``images`` (the
    run's last training batch) when there are two, else two mid-grey images (zeros)."""
    shape = (2, model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size)
    if images is not None and images.dim() == 4 and images.shape[0] >= 2 and tuple(images.shape[1:]) == shape[1:]:
        return images[:2].detach().float().cpu().contiguous()
    return torch.zeros(shape)


def log_autoencoder(encoder: nn.Module, decoder: nn.Module, model_cfg: Any, example: Tensor,
                    registered_name: str | None, pip_requirements: list[str]) -> Any:
    """``mlflow.pytorch.log_model`` of g∘f with the features program, signature, example and metadata, into
    the active MLflow run; returns MLflow's ModelInfo. The modules are moved to the CPU in eval mode."""
    import mlflow

    encoder, decoder = encoder.cpu().eval(), decoder.cpu().eval()
    model = Autoencoder(encoder, decoder).eval()
    for layer in model.modules():
        if isinstance(layer, CSCLayer):
            layer.forget_step_size()  # L as a checkpoint loaded back has it: one function however it is loaded
    with torch.no_grad():
        model(example)  # eager: atoms projected and step sizes current, so export traces the solver alone
    stages = len(encoder.csc_layers())
    with tempfile.TemporaryDirectory() as tmp:
        features = export_features(encoder, example, Path(tmp) / FEATURES_FILE)
        return mlflow.pytorch.log_model(model, name="model", registered_model_name=registered_name,
                                        signature=signature(model_cfg.in_channels, model_cfg.image_size),
                                        input_example=example.numpy(), extra_files=[str(features)],
                                        metadata=model_metadata(model_cfg, stages),
                                        pip_requirements=pip_requirements)
