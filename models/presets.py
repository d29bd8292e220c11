"""Named model configurations (REFERENCE.md §3), as in timm's ``@register_model`` / MAE's named builders.

    csc_ctrl_32            32 px, 3 halving stages (ndf, 2ndf, 4ndf: 32→16→8→4) + CSC k4 → d = 512, ndf 64
    csc_ctrl_prototype32   the authors' CIFAR prototype: 32 px, ndf 128, d = 512, decoder tied to the encoder
    csc_ctrl_48            48 px, 3 halving stages (48→24→12→6) + CSC k6 → d = 128, ndf 64
    csc_ctrl_128           128 px, 5 halving stages (ndf … 16ndf: 128→4) + CSC k4 → d = 128, ndf 64
    csc_ctrl_debug         32 px, ndf 8, d = 16: tiny, for tests and smoke runs

``preset_config(name)`` returns a fresh ModelConfig with ``preset=name``; the experiment config fills the
model section from it before the YAML file and overrides (pipeline/config.py).

Sparsity per stage: every preset uses λ = 0.1 (SDNet's default) except on stage 2, see ``STAGE2_LAM``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from models.config import ModelConfig

if TYPE_CHECKING:
    from models.decoder import CSCDecoder
    from models.encoder import CSCEncoder

_PRESETS: dict[str, Callable[[], ModelConfig]] = {}

LAM = 0.1
"""λ of the CSC stages whose input is on a unit scale: the images (stage 1) and BatchNorm outputs (stage 3 on)."""

STAGE2_LAM = 0.005
"""λ of stage 2 = LAM / 20. Stage 2 reads stage 1's raw code (REFERENCE.md §3 puts no BatchNorm after stage 1),
whose size is about η₁·|Aᵀx| with η₁ = 0.9 / L₁ (L₁ ≈ 11 at ndf 64, 18 at ndf 128): 20-30x below unit scale.
The threshold λη is absolute, so with λ = 0.1 stage 2 keeps only 0.1-2 % of its code at initialisation on
natural-image crops, and the ndf-128 prototype maps 11 of 16 crops to z = 0 (off the sphere, no gradient).
With LAM / 20 stage 2 keeps about 40 %, like every other stage (tests/models/test_presets.py checks this
on real photos)."""


def stage_lams(image_size: int) -> tuple[float, ...]:
    """(LAM, STAGE2_LAM, LAM, …): one λ per CSC stage of an encoder for ``image_size`` pixels."""
    num_stages = ModelConfig(image_size=image_size).num_stages
    return tuple(STAGE2_LAM if i == 1 else LAM for i in range(num_stages))


class UnknownPresetError(KeyError, ValueError):
    """A preset name that is not registered; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError would print the message inside quotes
        return str(self.args[0]) if self.args else ""


def register_preset(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
    """Register ``fn`` (returning a ModelConfig) under its function name."""
    name = fn.__name__
    if name in _PRESETS:
        raise ValueError(f"preset {name!r} is already registered")
    _PRESETS[name] = fn
    return fn


def list_presets() -> list[str]:
    """Registered preset names, sorted."""
    return sorted(_PRESETS)


def preset_config(name: str) -> ModelConfig:
    """A fresh ModelConfig of the preset ``name`` (its ``preset`` field set to ``name``)."""
    if name not in _PRESETS:
        raise UnknownPresetError(f"unknown model preset {name!r}; registered presets: {', '.join(list_presets())}")
    cfg = _PRESETS[name]()
    if cfg.preset != name:
        raise ValueError(f"preset function {name!r} must set preset={name!r}, got {cfg.preset!r}")
    return cfg


def create_model(name: str) -> tuple[CSCEncoder, CSCDecoder]:
    """(encoder, decoder) of the preset ``name``."""
    from models import build_models  # models/__init__ imports this module

    return build_models(preset_config(name))


@register_preset
def csc_ctrl_32() -> ModelConfig:
    """32 px (CIFAR-10 / Fashion-MNIST as RGB): 32→16→8→4, CSC k4 to d = 512, ndf 64."""
    return ModelConfig(preset="csc_ctrl_32", image_size=32, ndf=64, nz=512, lam_per_stage=stage_lams(32))


@register_preset
def csc_ctrl_prototype32() -> ModelConfig:
    """The authors' CSC-CTRL prototype (InverseNet, CIFAR config): 32 px, ndf 128, d = 512, and the decoder
    synthesising with the encoder's dictionaries (tied), as the prototype does."""
    return ModelConfig(preset="csc_ctrl_prototype32", image_size=32, ndf=128, nz=512, decoder_dictionaries="tied",
                       lam_per_stage=stage_lams(32))


@register_preset
def csc_ctrl_48() -> ModelConfig:
    """48 px (e.g. STL-10 / CelebA at 48): 48→24→12→6, CSC k6 to d = 128, ndf 64."""
    return ModelConfig(preset="csc_ctrl_48", image_size=48, ndf=64, nz=128, lam_per_stage=stage_lams(48))


@register_preset
def csc_ctrl_128() -> ModelConfig:
    """128 px ImageNet: 128→64→32→16→8→4 (ndf … 16ndf), CSC k4 to d = 128, ndf 64."""
    return ModelConfig(preset="csc_ctrl_128", image_size=128, ndf=64, nz=128, lam_per_stage=stage_lams(128))


@register_preset
def csc_ctrl_debug() -> ModelConfig:
    """Tiny 32 px model for tests and smoke runs: ndf 8, d = 16."""
    return ModelConfig(preset="csc_ctrl_debug", image_size=32, ndf=8, nz=16, lam_per_stage=stage_lams(32))
