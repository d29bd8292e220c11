"""The closed-loop transcription (CTRL) game value on batch statistics (docs/method.md §5).

References: CTRL (Dai et al., Entropy 2022, eq. 13-15: the multi-class game; the binary form treats Z and
Ẑ as two groups); u-CTRL's extra R(Z) term (Tong et al. 2023); CSC-CTRL (Dai et al., arXiv 2302.09347).

    Z = f(X),  X̂ = g(Z),  Ẑ = f(X̂);  encoder f maximises T, decoder g minimises T:

    binary:      T = ΔR(Z, Ẑ) = R(Z ∪ Ẑ) − ½R(Z) − ½R(Ẑ)
    multiclass:  T = ΔR(Z|Π) + ΔR(Ẑ|Π) + Σⱼ ΔR(Zⱼ, Ẑⱼ)
    optional:    T += w · R(Z)   (u-CTRL, w = rate_weight)
    consistency: C = Σᵢ (1 − cos(zᵢ, ẑᵢ))   (= Σᵢ (1 − ⟨zᵢ, ẑᵢ⟩) on unit-norm rows)

Terms are returned POSITIVE; the sign flip between the players is the trainer's (one place:
``pipeline/trainer.player_loss``), which also adds λ₂·C as a term of the game: g minimises it, f maximises it.

Statistics first, then the objective: ``ctrl_statistics`` reduces a (local) batch to per-class Grams of Z and
Ẑ, counts and the consistency sum; they are sums over samples, so summing them across ranks gives the
statistics of the global batch (``CTRLStats.to_flat`` packs everything into one tensor for one
all-reduce). ``ctrl_objective`` then computes every logdet in ONE batched Cholesky: 3 matrices (binary) or
2 + 3k (multiclass). Notation as in models/rate_reduction.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from models.rate_reduction import (autocast_off, class_gram, coding_rate_from_gram, stat_dtype, validate_eps_sq,
                                   validate_label_shape, validate_samples)

Mode = Literal["binary", "multiclass"]
MODES = ("binary", "multiclass")


@dataclass
class CTRLStats:
    """Sufficient statistics of a batch for the CTRL objective (sums over samples; ≥ fp32).

    gram_z:          (k, d, d)  Zⱼ Zⱼᵀ = Σ_{i in class j} zᵢ zᵢᵀ     (k = 1 in binary mode)
    gram_zhat:       (k, d, d)  Ẑⱼ Ẑⱼᵀ (ẑᵢ inherits the label of xᵢ)
    counts:          (k,)       nⱼ
    consistency_sum: ()         Σᵢ (1 − cos(zᵢ, ẑᵢ))
    """

    gram_z: Tensor
    gram_zhat: Tensor
    counts: Tensor
    consistency_sum: Tensor

    @property
    def num_classes(self) -> int:
        return self.gram_z.shape[0]

    @property
    def dim(self) -> int:
        return self.gram_z.shape[-1]

    def to_flat(self) -> Tensor:
        """All statistics in one 1-D tensor of 2kd² + k + 1 values (for one all-reduce; differentiable)."""
        return torch.cat([self.gram_z.reshape(-1), self.gram_zhat.reshape(-1), self.counts.reshape(-1),
                          self.consistency_sum.reshape(1)])

    @classmethod
    def from_flat(cls, flat: Tensor, k: int, d: int) -> CTRLStats:
        """Inverse of ``to_flat`` for k classes and feature dimension d."""
        expected = 2 * k * d * d + k + 1
        if flat.dim() != 1 or flat.numel() != expected:
            raise ValueError(f"CTRLStats.from_flat expects a 1-D tensor of 2·k·d² + k + 1 = {expected} values "
                             f"(k={k}, d={d}), got shape {tuple(flat.shape)}")
        gram_z, gram_zhat, counts, consistency = torch.split(flat, [k * d * d, k * d * d, k, 1])
        return cls(gram_z.view(k, d, d), gram_zhat.view(k, d, d), counts, consistency.view(()))


@dataclass
class CTRLTerms:
    """Named positive terms of the CTRL game value (0-dim tensors; None where the mode has no such term).

    objective:       T, the game value (f maximises, g minimises)
    consistency:     Σᵢ (1 − cos(zᵢ, ẑᵢ)), a term of the game with weight λ₂ (trainer: g minimises, f maximises)
    rate_z:          R(Z) (enters T only with rate_weight)
    delta_r_z_zhat:  ΔR(Z, Ẑ)                    binary
    delta_r_z:       ΔR(Z|Π)                      multiclass
    delta_r_zhat:    ΔR(Ẑ|Π)                      multiclass
    delta_r_pairs:   Σⱼ ΔR(Zⱼ, Ẑⱼ)                multiclass
    """

    objective: Tensor
    consistency: Tensor
    rate_z: Tensor
    delta_r_z_zhat: Tensor | None = None
    delta_r_z: Tensor | None = None
    delta_r_zhat: Tensor | None = None
    delta_r_pairs: Tensor | None = None

    def as_dict(self) -> dict[str, Tensor]:
        """{name: detached 0-dim tensor} of the terms present (for logging; no host sync)."""
        return {f.name: getattr(self, f.name).detach() for f in fields(self) if getattr(self, f.name) is not None}


def ctrl_statistics(z: Tensor, z_hat: Tensor, labels: Tensor | None, num_classes: int, mode: Mode,
                    tf32_grams: bool = False) -> CTRLStats:
    """Statistics of one (local) batch: z, z_hat (n, d) rows are samples (unit-norm encoder outputs);
    labels (n,) int in [0, num_classes) for 'multiclass' (ignored in 'binary', where k = 1).

    Computed in ≥ fp32 with autocast off, without host sync (labels outside [0, k) are left out of every
    class: validate them once with ``models.rate_reduction.check_labels``). tf32_grams: the class Grams'
    products on TF32 tensor cores on CUDA (``class_gram``); the trainer sets it when the networks run in bf16.
    """
    _check_mode(mode)
    validate_samples(z)
    validate_samples(z_hat, "z_hat")
    if z.shape != z_hat.shape:
        raise ValueError(f"ctrl_statistics expects z and z_hat of the same shape (n, d), got {tuple(z.shape)} "
                         f"and {tuple(z_hat.shape)}")
    with autocast_off(z):
        z, z_hat = z.to(stat_dtype(z)), z_hat.to(stat_dtype(z_hat))
        consistency = (1.0 - F.cosine_similarity(z, z_hat, dim=1)).sum()
        if mode == "binary":
            counts = torch.full((1,), float(z.shape[0]), dtype=z.dtype, device=z.device)
            return CTRLStats((z.T @ z)[None], (z_hat.T @ z_hat)[None], counts, consistency)
        if labels is None:
            raise ValueError("mode='multiclass' needs labels (n,) int in [0, num_classes), got None")
        validate_label_shape(labels, z.shape[0])
        grams, counts = class_gram(z, labels, num_classes, tf32=tf32_grams)
        grams_hat, _ = class_gram(z_hat, labels, num_classes, tf32=tf32_grams)
        return CTRLStats(grams, grams_hat, counts, consistency)


def ctrl_objective(stats: CTRLStats, mode: Mode, eps_sq: float, rate_weight: float = 0.0) -> CTRLTerms:
    """The game value T and its named positive terms from (possibly all-reduced) statistics.

    binary (k = 1), logdets of [G_Z, G_Ẑ, G_Z + G_Ẑ] with counts [n, n, 2n]:
        ΔR(Z, Ẑ) = R(Z ∪ Ẑ) − ½R(Z) − ½R(Ẑ)
    multiclass, logdets of [G_Z, G_Ẑ, G_Zⱼ (k), G_Ẑⱼ (k), G_Zⱼ + G_Ẑⱼ (k)], G_Z = Σⱼ G_Zⱼ, n = Σⱼ nⱼ:
        ΔR(Z|Π) = R(Z) − Σⱼ (nⱼ/n) R(Zⱼ),   ΔR(Ẑ|Π) = R(Ẑ) − Σⱼ (nⱼ/n) R(Ẑⱼ),
        Σⱼ ΔR(Zⱼ, Ẑⱼ) = Σⱼ [R(Zⱼ ∪ Ẑⱼ) − ½R(Zⱼ) − ½R(Ẑⱼ)]
    T = the mode's terms summed, + rate_weight · R(Z). An empty class (nⱼ = 0) contributes 0 everywhere.
    No sign flip here: the trainer negates T for the encoder.
    """
    _check_mode(mode)
    validate_eps_sq(eps_sq)
    if not (math.isfinite(rate_weight) and rate_weight >= 0):
        raise ValueError(f"rate_weight must be a finite number >= 0, got {rate_weight!r}")
    k = stats.num_classes
    if mode == "binary" and k != 1:
        raise ValueError(f"mode='binary' expects statistics with one group (k = 1), got k = {k}; build them "
                         f"with ctrl_statistics(..., mode='binary')")
    g, g_hat, counts = stats.gram_z, stats.gram_zhat, stats.counts
    if mode == "binary":
        r = coding_rate_from_gram(torch.cat([g, g_hat, g + g_hat]), torch.cat([counts, counts, 2 * counts]), eps_sq)
        rate_z = r[0]
        delta = r[2] - 0.5 * r[0] - 0.5 * r[1]
        return CTRLTerms(objective=delta + rate_weight * rate_z, consistency=stats.consistency_sum,
                         rate_z=rate_z, delta_r_z_zhat=delta)

    n = counts.sum()
    grams = torch.cat([g.sum(0, keepdim=True), g_hat.sum(0, keepdim=True), g, g_hat, g + g_hat])
    r = coding_rate_from_gram(grams, torch.cat([n[None], n[None], counts, counts, 2 * counts]), eps_sq)
    rate_z, rate_zhat = r[0], r[1]
    class_z, class_zhat, class_union = r[2:2 + k], r[2 + k:2 + 2 * k], r[2 + 2 * k:]
    weights = counts / n.clamp(min=1.0)  # nⱼ / n
    delta_r_z = rate_z - (weights * class_z).sum()
    delta_r_zhat = rate_zhat - (weights * class_zhat).sum()
    delta_r_pairs = (class_union - 0.5 * class_z - 0.5 * class_zhat).sum()
    objective = delta_r_z + delta_r_zhat + delta_r_pairs + rate_weight * rate_z
    return CTRLTerms(objective=objective, consistency=stats.consistency_sum, rate_z=rate_z,
                     delta_r_z=delta_r_z, delta_r_zhat=delta_r_zhat, delta_r_pairs=delta_r_pairs)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
