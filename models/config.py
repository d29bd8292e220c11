"""Architecture configuration of the CSC-CTRL autoencoder (docs/method.md §3).

Lives beside the models (nanoGPT keeps ``GPTConfig`` beside ``GPT``); ``pipeline/config.py`` composes
it into the experiment tree. Presets are named instances of this class in ``models/presets.py``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ARCHITECTURE_KEYS = ("layer", "image_size", "in_channels", "ndf", "ngf", "nz", "decoder_dictionaries")
"""The ModelConfig fields that fix what a model's weights are: their shapes, and (``layer``) whether they are
CSC dictionaries or plain convolution filters, which have the same shapes. A checkpoint resumes and a
registered model name takes a new version only where all of them agree (pipeline/checkpoint.py
``check_architecture``, pipeline/workflow/runner.py)."""


@dataclass
class ModelConfig:
    preset: str = ""
    """Name of a preset in ``models/presets.py`` whose values replace these defaults before the YAML
    file and the overrides are applied ("" = none). See ``cscctrl train --help`` for the list."""

    image_size: int = 32
    """Input resolution (square). The encoder halves it with k4-s2-p1 CSC stages while it is even and
    larger than 6 (32→16→8→4, 48→24→12→6, 128→64→…→4); a last CSC stage with a valid kernel of the
    remaining size maps it to 1×1."""

    in_channels: int = 3
    """Image channels: 3 (RGB) or 1 (grey). The data path decodes every image to this many channels (grey
    replicated to RGB, or colour to its luminance). Grey data such as Fashion-MNIST should use 1: with 3,
    two thirds of each first-stage atom is colour the data never trains, which the decoder then draws as
    colour noise (benchmarks/results/fidelity)."""

    ndf: int = 64
    """Atoms of the first encoder stage; each halving stage doubles it (ndf, 2ndf, 4ndf, …)."""

    ngf: int = 0
    """Width of the decoder's first (largest-resolution) stage; 0 = same as ndf (a mirror image)."""

    nz: int = 512
    """Feature dimension d of z = f(x) / ‖f(x)‖ on the unit sphere."""

    layer: Literal["csc", "conv"] = "csc"
    """What each encoder and decoder stage is. 'csc': convolutional sparse coding (docs/method.md §2), the
    CSC-CTRL model. 'conv': the "CTRL with plain convolutions" baseline of the same size (models/conv.py):
    every CSC stage of the encoder becomes an ordinary convolution of the same kernel, stride, padding and
    channels (bias-free, as the CSC layer has none), and every synthesis stage of the decoder an ordinary
    transposed convolution of the same shape (weights not normalised); everything else (BatchNorm,
    activations, widths, normalisation of z, the CTRL game) is unchanged, and so is the parameter count.
    With 'conv' the solver fields below (n_steps, lam, stage2_lam_scale, lam_per_stage, mu, nonneg,
    nonneg_features, solver, power_iters, power_iters_warm) have no effect, and decoder_dictionaries
    must be 'separate'."""

    n_steps: int = 2
    """Unrolled proximal-gradient steps n per CSC layer (SDNet default 2)."""

    n_steps_per_stage: tuple[int, ...] = ()
    """Optional explicit n per encoder stage (one value per CSC stage, the last 1×1 stage included);
    () = n_steps everywhere. A stage whose dictionary is learned by sparse coding
    (objective.dictionary_weight) needs codes that explain its input: tens of steps, not two
    (docs/method.md §2.2)."""

    lam: float = 0.1
    """Sparsity weight λ of every CSC layer (SDNet default 0.1)."""

    stage2_lam_scale: float = 0.05
    """Multiplier of λ on encoder stage 2. Stage 2 reads stage 1's raw code (docs/method.md §3 puts no
    BatchNorm after stage 1), whose size is about η₁·|Aᵀx|, 20-30x below the unit scale of the other
    stages' inputs; the threshold λη is absolute, so with the full λ stage 2 keeps 0.1-2 % of its code at
    initialisation and many images map to z = 0. With λ/20 it keeps about 40 %, like the other stages
    (tests/models/test_presets.py measures both on real photos). 1.0 = the same λ everywhere."""

    lam_per_stage: tuple[float, ...] = ()
    """Optional explicit λ per encoder stage (one value per CSC stage, the last 1×1 stage included);
    () = lam on every stage, times stage2_lam_scale on stage 2 and final_lam_scale on the last."""

    mu: float = 0.0
    """Elastic-net weight μ of every CSC layer (0 = plain ℓ₁)."""

    nonneg: bool = True
    """Non-negative codes (ReLU proximal map), as SDNet's DictBlock."""

    nonneg_features: bool = False
    """Non-negativity of the final 1×1 stage's code, i.e. of z before normalisation (applies only when
    nonneg is true). False (default) lets the features use the whole sphere, as CTRL's linear last layer
    does; True keeps every CSC stage alike, and measured, CTRL training then silences the last stage's
    units one by one until most images map to z = 0 (benchmarks/results/fashion_mnist32)."""

    final_lam_scale: float = 0.0
    """Multiplier of λ on the final 1×1 stage (the features). 0 (default): that stage is a CSC layer
    without the ℓ₁ term (its n unrolled steps then solve least squares), so no feature is thresholded
    to zero; see nonneg_features for the measurements. 1.0 = the same λ as the other stages."""

    solver: Literal["fista", "ista"] = "fista"
    """Unrolled solver: FISTA momentum from step 3 on, or plain ISTA."""

    decoder_dictionaries: Literal["separate", "tied"] = "separate"
    """'separate': the decoder has its own unit-norm dictionaries (a true second player, as in CTRL);
    'tied': the decoder synthesises with the encoder's dictionaries (as in the authors' prototype)."""

    init: Literal["torch", "dcgan"] = "torch"
    """Initial weights (models/init.py). 'torch': each layer's own draw (U(−b, b), b = 1/√fan_in; BatchNorm
    γ = 1). 'dcgan': N(0, 0.02²) weights and BatchNorm γ ~ N(1, 0.02²), as LDR (the authors' CTRL code)
    initialises its MNIST networks. CSC atoms are unit-normed either way, so for layer='csc' only their
    random directions differ; for layer='conv' it is LDR's recipe."""

    decoder_bn_gamma: float = 1.0
    """Initial γ of every decoder BatchNorm (β = 0), set after ``init``. The decoder's atoms have unit norm,
    so the amplitude of x̂ before the final Tanh is set by the last BatchNorm's γ: at 1 the Tanh starts
    saturated (x̂ ≈ ±1 noise, below predicting grey), at 0.1-0.5 near grey. The measurements, and why the
    decoder's learning rate matters more: benchmarks/results/fashion_mnist32/README.md."""

    power_iters: int = 50
    """Power-iteration steps for L = ‖A‖₂² on a cold start (a new spatial size), stopping at relative
    change < 1e-5."""

    power_iters_warm: int = 5
    """Warm-started power-iteration steps after each optimizer step of the dictionaries' owner (fixed
    count, so no host-device synchronisation)."""

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ValueError(f"model.image_size={self.image_size}: must be at least 8 pixels")
        for name in ("in_channels", "ndf", "nz", "n_steps", "power_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)}: must be >= 1")
        if self.ngf < 0:
            raise ValueError(f"model.ngf={self.ngf}: must be >= 0 (0 = same as ndf)")
        if self.lam < 0 or any(v < 0 for v in self.lam_per_stage):
            raise ValueError(f"model.lam / model.lam_per_stage must be >= 0, got {self.lam} / {self.lam_per_stage}")
        if self.stage2_lam_scale < 0 or self.final_lam_scale < 0:
            raise ValueError(f"model.stage2_lam_scale={self.stage2_lam_scale} and model.final_lam_scale="
                             f"{self.final_lam_scale}: must be >= 0")
        if self.mu < 0:
            raise ValueError(f"model.mu={self.mu}: must be >= 0")
        if self.layer not in ("csc", "conv"):
            raise ValueError(f"model.layer={self.layer!r}: must be one of 'csc' (CSC-CTRL), 'conv' (the "
                             f"plain-convolution baseline)")
        if self.decoder_bn_gamma <= 0:
            raise ValueError(f"model.decoder_bn_gamma={self.decoder_bn_gamma}: must be > 0")
        if self.init not in ("torch", "dcgan"):
            raise ValueError(f"model.init={self.init!r}: must be 'torch' (each layer's own initialisation) or "
                             f"'dcgan' (N(0, 0.02²) weights, as LDR's MNIST networks)")
        if self.layer == "conv" and self.decoder_dictionaries == "tied":
            raise ValueError("model.layer='conv' cannot have model.decoder_dictionaries='tied': tied decoders "
                             "synthesise with the encoder's CSC dictionaries, and the conv baseline has none. "
                             "Set model.decoder_dictionaries=separate (or model.layer=csc).")
        if any(v < 1 for v in self.n_steps_per_stage):
            raise ValueError(f"model.n_steps_per_stage={self.n_steps_per_stage}: every value must be >= 1")
        if self.n_steps_per_stage and len(self.n_steps_per_stage) != self.num_stages:
            raise ValueError(
                f"model.n_steps_per_stage has {len(self.n_steps_per_stage)} values but image_size={self.image_size} "
                f"gives {self.num_stages} CSC stages ({self.num_stages - 1} halving + 1 final)")
        if self.lam_per_stage and len(self.lam_per_stage) != self.num_stages:
            raise ValueError(
                f"model.lam_per_stage has {len(self.lam_per_stage)} values but image_size={self.image_size} "
                f"gives {self.num_stages} CSC stages ({self.num_stages - 1} halving + 1 final)")

    # ---- derived architecture (one place; encoder and decoder both read it) ----

    @property
    def resolutions(self) -> list[int]:
        """Spatial size entering each halving stage, then the final size: 32 → [32, 16, 8, 4]."""
        sizes = [self.image_size]
        while sizes[-1] > 6 and sizes[-1] % 2 == 0:
            sizes.append(sizes[-1] // 2)
        return sizes

    @property
    def num_stages(self) -> int:
        """CSC stages of the encoder: the halving stages plus the final valid-kernel stage."""
        return len(self.resolutions)

    def stage_lams(self) -> list[float]:
        """λ of each encoder stage: lam_per_stage if given, else lam (× stage2_lam_scale on stage 2,
        × final_lam_scale on the final 1×1 stage)."""
        if self.lam_per_stage:
            return list(self.lam_per_stage)
        lams = [self.lam * (self.stage2_lam_scale if i == 1 else 1.0) for i in range(self.num_stages)]
        lams[-1] = self.lam * self.final_lam_scale
        return lams

    def stage_n_steps(self) -> list[int]:
        """Unrolled steps n of each encoder stage: n_steps_per_stage if given, else n_steps everywhere."""
        return list(self.n_steps_per_stage) if self.n_steps_per_stage else [self.n_steps] * self.num_stages

    @property
    def decoder_width(self) -> int:
        return self.ngf or self.ndf
