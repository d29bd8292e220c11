"""The encoder f of CSC-CTRL: a stack of convolutional sparse coding stages (docs/method.md §3).

    x (b, C, S, S) ── CSC(k4 s2 p1) → LeakyReLU(0.2)                          stage 1: C → ndf,   S → S/2
                   ── CSC(k4 s2 p1) → BatchNorm → LeakyReLU(0.2)              stage i: ndf·2^(i−2) → ndf·2^(i−1)
                   ── …                                                       (while the side is even and > 6)
                   ── CSC(k = final side, s1 p0)                               last: → nz channels at 1×1
                   ── flatten, z = f(x) / ‖f(x)‖₂                              z (b, nz) on the unit sphere

The stage sizes come from ``ModelConfig.resolutions`` (32 → [32, 16, 8, 4]); λ per stage from
``ModelConfig.stage_lams()``. Each CSC stage is a ``models.csc.CSCLayer`` (unrolled FISTA/ISTA); with
``ModelConfig.layer = "conv"`` (the plain-convolution baseline) it is a ``models.conv.ConvLayer`` of the same
kernel, stride, padding and channels, and everything else stays as drawn above.
"""
from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ModelConfig
from models.conv import ConvLayer
from models.csc import CSCLayer

LEAKY_SLOPE = 0.2
"""Negative slope of the encoder's LeakyReLU (DCGAN discriminator pattern of the authors' prototype)."""


def make_analysis_layer(cfg: ModelConfig, in_channels: int, num_atoms: int, kernel_size: int, stride: int,
                        padding: int, lam: float, nonneg: bool | None = None,
                        n_steps: int | None = None) -> CSCLayer | ConvLayer:
    """An encoder layer of ``cfg.layer``: a CSCLayer with the solver settings of ``cfg`` (the one place they
    are read), or for the baseline ``cfg.layer == "conv"`` a ConvLayer of the same shape (no solver)."""
    if cfg.layer == "conv":
        return ConvLayer(in_channels, num_atoms, kernel_size, stride, padding)
    return CSCLayer(in_channels, num_atoms, kernel_size, stride, padding,
                    n_steps=cfg.n_steps if n_steps is None else n_steps, lam=lam,
                    mu=cfg.mu, nonneg=cfg.nonneg if nonneg is None else nonneg, solver=cfg.solver,
                    power_iters=cfg.power_iters, power_iters_warm=cfg.power_iters_warm)


def encoder_widths(cfg: ModelConfig, base: int) -> list[int]:
    """Channels after each halving stage: base, 2·base, 4·base, … (one per resolution halving)."""
    return [base * 2 ** i for i in range(len(cfg.resolutions) - 1)]


class EncoderStage(nn.Module):
    """CSC → (BatchNorm) → LeakyReLU(0.2); returns the activation and the sparse code (the conv output for
    the baseline). The owning encoder updates the CSC layer's atoms and step size before calling it."""

    def __init__(self, csc: CSCLayer | ConvLayer, batch_norm: bool) -> None:
        super().__init__()
        self.csc = csc
        self.norm: nn.Module = nn.BatchNorm2d(csc.num_atoms) if batch_norm else nn.Identity()
        self.act = nn.LeakyReLU(LEAKY_SLOPE)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        code = self.csc.solve(x)
        return self.act(self.norm(code)), code


class Encoder(nn.Module):
    """f: images (b, C, S, S) in [−1, 1] → features z (b, nz) with ‖zᵢ‖₂ = 1; its stages are CSC layers or,
    with model.layer=conv, plain convolutions (``make_analysis_layer``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        resolutions, lams, steps = cfg.resolutions, cfg.stage_lams(), cfg.stage_n_steps()
        stages = []
        channels = cfg.in_channels
        for i, width in enumerate(encoder_widths(cfg, cfg.ndf)):
            csc = make_analysis_layer(cfg, channels, width, kernel_size=4, stride=2, padding=1, lam=lams[i],
                                 n_steps=steps[i])
            # Stage 1 has no BatchNorm. With non-negative codes its LeakyReLU is the identity (codes ≥ 0);
            # it matters when cfg.nonneg is False.
            stages.append(EncoderStage(csc, batch_norm=i > 0))
            channels = width
        self.stages = nn.ModuleList(stages)
        # Valid kernel of the remaining side: (final, final) → 1×1 with nz atoms.
        self.final = make_analysis_layer(cfg, channels, cfg.nz, kernel_size=resolutions[-1], stride=1, padding=0,
                                    lam=lams[-1], nonneg=cfg.nonneg and cfg.nonneg_features, n_steps=steps[-1])

    def csc_layers(self) -> list[CSCLayer | ConvLayer]:
        """The CSC layers in input-to-output order (the halving stages, then the final 1×1 stage); for the
        baseline (cfg.layer == "conv") the ConvLayers in their place."""
        return [cast(EncoderStage, stage).csc for stage in self.stages] + [self.final]

    def forward(self, x: Tensor) -> Tensor:
        """z = f(x) / ‖f(x)‖₂: x (b, C, S, S) → z (b, nz)."""
        return self.forward_with_codes(x)[0]

    def forward_with_codes(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """z (b, nz) and the sparse code of every CSC stage (before BatchNorm/activation), input to output:
        [(b, ndf, S/2, S/2), …, (b, nz, 1, 1)], for sparsity metrics and pictures. For the baseline these
        are the (dense) conv outputs at the same places."""
        z, codes, _ = self.forward_stages(x)
        return z, codes

    def forward_stages(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """z, the code z_l of every CSC stage and the input h_{l−1} that stage l coded (h₀ = x), so that
        h_{l−1} ≈ A_l z_l can be measured (residuals) and learned (the dictionary loss)."""
        self._check_input(x)
        self.update_atoms()
        codes, inputs = [], []
        h = x
        for stage in self.stages:
            inputs.append(h)
            h, code = stage(h)
            codes.append(code)
        inputs.append(h)
        code = self.final.solve(h)
        codes.append(code)
        return F.normalize(code.flatten(1), dim=1), codes, inputs

    @torch.compiler.disable  # Python-side bookkeeping, once per forward: the stages then form one graph
    def update_atoms(self) -> None:
        """Bring every CSC layer's atoms and step size up to date for its input size (cfg.resolutions)."""
        sizes = self.cfg.resolutions  # stage i reads resolutions[i]; the final stage reads resolutions[-1]
        for layer, size in zip(self.csc_layers(), sizes[:-1] + sizes[-1:]):
            layer.update_atoms((size, size))

    def _check_input(self, x: Tensor) -> None:
        c, s = self.cfg.in_channels, self.cfg.image_size
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"encoder expects (b, {c}, {s}, {s}) images, got {tuple(x.shape)}")
