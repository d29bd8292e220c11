"""What the encoder's sparse coding is doing: the measures of models/dictionary.py under one set of names,
for the training loop (logged at its cadence) and for ``cscctrl eval`` (docs/method.md §2.2).

    sparsity/stage{l}          fraction of non-zero entries of the code z_l             (eq. 7)
    code/stage{l}/residual     ‖h_{l−1} − A_l z_l‖ / ‖h_{l−1}‖: how much of its input stage l explains (eq. 6)
    code/stage1_psnr           PSNR of A₁ z₁ against x: the image as stage 1 alone codes it
    atoms/stage1/roughness     eq. (8): ≈ 1.07 for random 4×4 atoms, 0.2-0.4 for smooth edges
    atoms/stage1/flat_fraction eq. (10)
    atoms/stage1/chroma_fraction  eq. (11), colour models only: 2/3 for random atoms
    atoms/stage{l}/drift       1 − cos(a, a_init), mean over atoms                      (eq. 9)

The residual and stage-1 PSNR exist only for CSC stages (the plain-convolution baseline has no synthesis
in its encoder); the atom measures apply to its first-stage filters as well, logged as filters/… . All values are 0-dim tensors
(no host sync until the caller reads them).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from models import build_models
from models.config import ModelConfig
from models.conv import ConvLayer
from models.csc import CSCLayer
from models.dictionary import atom_drift, dictionary_summary, nonzero_fraction, relative_residual

PSNR_RANGE = 2.0
"""Peak-to-peak range of images in [−1, 1]."""


def initial_dictionaries(model: ModelConfig, seed: int) -> list[Tensor]:
    """The encoder's stage weights as the run drew them: the trainer seeds torch with run.seed and builds
    the models, so the same call rebuilds them (here without touching the global RNG state)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder, _ = build_models(model)
    return [layer.weight.detach().clone() for layer in encoder.csc_layers()]


def first_stage_weight(encoder: nn.Module) -> Tensor:
    """The weight (M, C, k, k) of the encoder's first stage, whose M filters live in pixel space: the
    dictionary atoms of a CSC model, the convolution filters of the plain-convolution baseline."""
    for m in encoder.modules():
        if isinstance(m, (CSCLayer, ConvLayer)):
            return m.weight
    raise ValueError("the encoder has no CSC or convolution layer")


@torch.no_grad()
def code_measures(encoder: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Sparsity of every stage; residual of every CSC stage and the stage-1 PSNR, on the batch x (one
    forward of the encoder as it is: the caller picks train/eval mode and autocast)."""
    _, codes, inputs = encoder.forward_stages(x)
    return stage_measures(encoder, x, codes, inputs)


@torch.no_grad()
def stage_measures(encoder: nn.Module, x: Tensor, codes: list[Tensor], inputs: list[Tensor]) -> dict[str, Tensor]:
    """``code_measures`` from the codes and stage inputs of a forward already made (``forward_stages``)."""
    out = {f"sparsity/stage{i + 1}": nonzero_fraction(c) for i, c in enumerate(codes)}
    layers = encoder.csc_layers()
    for i, (layer, h, z) in enumerate(zip(layers, inputs, codes)):
        if isinstance(layer, CSCLayer):
            out[f"code/stage{i + 1}/residual"] = relative_residual(layer, h, z)
    first = layers[0]
    if isinstance(first, CSCLayer):
        with torch.autocast(device_type=x.device.type, enabled=False):
            x1 = first.synthesize(codes[0].float(), tuple(x.shape[-2:])).clamp(-1.0, 1.0)
        mse = (x1 - x.float()).pow(2).flatten(1).mean(1)  # per image, then the mean PSNR (as eval's psnr)
        out["code/stage1_psnr"] = (10.0 * torch.log10(PSNR_RANGE ** 2 / mse.clamp_min(1e-12))).mean()
    return out


@torch.no_grad()
def atom_measures(encoder: nn.Module, initial: list[Tensor] | None = None) -> dict[str, Tensor]:
    """Roughness, flat and chroma fraction of the stage-1 atoms (pixel space); drift of every stage from
    ``initial`` (``initial_dictionaries``) when given."""
    layers = encoder.csc_layers()
    kind = weights_name(encoder)
    out = {f"{kind}/stage1/{k}": v for k, v in dictionary_summary(layers[0].weight).items()}
    if initial is not None:
        for i, (layer, w0) in enumerate(zip(layers, initial)):
            out[f"{kind}/stage{i + 1}/drift"] = atom_drift(layer.weight, w0).mean()
    return out


def coding_metric_names(model: ModelConfig) -> list[str]:
    """The keys ``code_measures`` and ``atom_measures`` (with initial atoms) give for a model of this config,
    so that what a sweep may rank by is known before any trial runs (tuning/spec.py)."""
    stages = range(1, model.num_stages + 1)
    names = [f"sparsity/stage{i}" for i in stages]
    kind = "atoms" if model.layer == "csc" else "filters"
    if model.layer == "csc":
        names += [f"code/stage{i}/residual" for i in stages] + ["code/stage1_psnr"]
    names += [f"{kind}/stage1/roughness", f"{kind}/stage1/flat_fraction"]
    if model.in_channels == 3:
        names.append(f"{kind}/stage1/chroma_fraction")
    return names + [f"{kind}/stage{i}/drift" for i in stages]


def weights_name(encoder: nn.Module) -> str:
    """"atoms" for a CSC encoder, "filters" for the plain-convolution baseline, which has no dictionary:
    the same measures of its first-stage filters are logged under that name."""
    return "atoms" if isinstance(encoder.csc_layers()[0], CSCLayer) else "filters"
