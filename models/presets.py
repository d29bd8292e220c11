"""Named model configurations (docs/method.md §3), as in timm's ``@register_model`` / MAE's named builders.

    csc_ctrl_32            32 px, 3 halving stages (ndf, 2ndf, 4ndf: 32→16→8→4) + CSC k4 → d = 512, ndf 64
    csc_ctrl_prototype32   the authors' CIFAR prototype: 32 px, ndf 128, d = 512, decoder tied to the encoder
    csc_ctrl_48            48 px, 3 halving stages (48→24→12→6) + CSC k6 → d = 128, ndf 64
    csc_ctrl_128           128 px, 5 halving stages (ndf … 16ndf: 128→4) + CSC k4 → d = 128, ndf 64
    csc_ctrl_debug         32 px, ndf 8, d = 16: tiny, for tests and smoke runs

``preset_config(name)`` returns a fresh ModelConfig with ``preset=name``; the experiment config fills the
model section from it before the YAML file and overrides (pipeline/config.py).

Sparsity per stage: every preset uses λ = 0.1 (SDNet's default), scaled on stage 2 by
ModelConfig.stage2_lam_scale and on the final 1×1 feature stage by ModelConfig.final_lam_scale (0: signed,
unthresholded features); their docstrings say why.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from models.build import build_models
from models.config import ModelConfig

if TYPE_CHECKING:
    from models.decoder import Decoder
    from models.encoder import Encoder

_PRESETS: dict[str, Callable[[], ModelConfig]] = {}

LAM = 0.1
"""λ of every preset (SDNet's default); stage 2 uses LAM × ModelConfig.stage2_lam_scale (see its docstring)."""


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


def create_model(name: str) -> tuple[Encoder, Decoder]:
    """(encoder, decoder) of the preset ``name``."""
    return build_models(preset_config(name))


@register_preset
def csc_ctrl_32() -> ModelConfig:
    """32 px (CIFAR-10 / Fashion-MNIST as RGB): 32→16→8→4, CSC k4 to d = 512, ndf 64."""
    return ModelConfig(preset="csc_ctrl_32", image_size=32, ndf=64, nz=512)


@register_preset
def csc_ctrl_prototype32() -> ModelConfig:
    """The authors' CSC-CTRL prototype (InverseNet, CIFAR config): 32 px, ndf 128, d = 512, and the decoder
    synthesising with the encoder's dictionaries (tied), as the prototype does."""
    return ModelConfig(preset="csc_ctrl_prototype32", image_size=32, ndf=128, nz=512, decoder_dictionaries="tied")


@register_preset
def csc_ctrl_48() -> ModelConfig:
    """48 px (e.g. STL-10 / CelebA at 48): 48→24→12→6, CSC k6 to d = 128, ndf 64."""
    return ModelConfig(preset="csc_ctrl_48", image_size=48, ndf=64, nz=128)


@register_preset
def csc_ctrl_128() -> ModelConfig:
    """128 px ImageNet: 128→64→32→16→8→4 (ndf … 16ndf), CSC k4 to d = 128, ndf 64."""
    return ModelConfig(preset="csc_ctrl_128", image_size=128, ndf=64, nz=128)


@register_preset
def csc_ctrl_debug() -> ModelConfig:
    """Tiny 32 px model for tests and smoke runs: ndf 8, d = 16."""
    return ModelConfig(preset="csc_ctrl_debug", image_size=32, ndf=8, nz=16)
