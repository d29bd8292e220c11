"""Learning and inspecting the CSC dictionaries (docs/method.md §2.2).

Each encoder stage l codes its input h_{l−1} (h₀ = x) as z_l ≈ argmin λ‖z‖₁ + ½‖h_{l−1} − A_l z‖², eq. (1) of
models/csc.py. Sparse coding learns A_l by alternating two steps: code with A_l fixed (the unrolled solver),
then move A_l to explain the input with the codes fixed. The second step is the stage-local dictionary loss

    (5)  D_l = ‖sg(h_{l−1}) − A_l sg(z_l)‖²_F / ‖sg(h_{l−1})‖²_F          sg = stop-gradient

whose gradient reaches A_l only: it is neither a pixel loss on g(f(x)) nor a term of the CTRL game, it is
the dictionary update of convolutional dictionary learning on the encoder's own input. The same quantities
describe how well a stage codes (logged during training and by ``cscctrl eval``):

    (6)  residual_l   = ‖h_{l−1} − A_l z_l‖_F / ‖h_{l−1}‖_F                     (√D_l)
    (7)  nonzero_l    = fraction of entries of z_l that are ≠ 0
    (8)  roughness(a) = mean_{p∼q} (a_p − a_q)² / (2 · var(a)),  per channel, mean removed
                        p∼q: horizontally or vertically adjacent pixels; i.i.d. noise ≈ 1.07 for
                        4×4 atoms, smooth oriented edges ≈ 0.2-0.4
    (9)  drift(a)     = 1 − cos(a, a_init),  a_init the atom the run started from
    (10) flat(a)      = [ Σ_c var_c(a) · k² < 0.1 ‖a‖² ]   (almost no spatial variation)
    (11) chroma(a)    = ‖a − mean_c(a)‖² / ‖a‖²  (C = 3; i.i.d. noise ≈ 2/3, luminance-only atoms 0)

Atoms are the dictionary's rows a = W[m] of shape (C, k, k). Pure tensor functions, no I/O.
"""
from __future__ import annotations

import torch
from torch import Tensor

from models.csc import CSCLayer, synthesize_with

FLAT_ENERGY = 0.1
"""An atom is flat (eq. 10) when less than this share of its energy is spatial variation."""


def dictionary_loss(layer: CSCLayer, h: Tensor, z: Tensor) -> Tensor:
    """Eq. (5): relative squared residual of coding ``h`` (b, C, H, W) by ``z`` with ``layer``'s atoms; the
    gradient reaches ``layer.weight`` only (h and z are detached). Computed in ≥ fp32 with autocast off."""
    weight = layer.weight
    dtype = torch.promote_types(weight.dtype, torch.float32)
    with torch.autocast(device_type=weight.device.type, enabled=False):
        h = h.detach().to(dtype)
        recon = synthesize_with(z.detach().to(dtype), weight.to(dtype), (h.shape[-2], h.shape[-1]), layer.stride,
                                layer.padding)
        return (h - recon).pow(2).sum() / h.pow(2).sum().clamp_min(1e-12)


@torch.no_grad()
def relative_residual(layer: CSCLayer, h: Tensor, z: Tensor) -> Tensor:
    """Eq. (6): ‖h − A z‖ / ‖h‖ over the batch (0-dim fp32 tensor, no host sync)."""
    return dictionary_loss(layer, h, z).sqrt()


def nonzero_fraction(z: Tensor) -> Tensor:
    """Eq. (7): fraction of non-zero code entries (0-dim fp32 tensor)."""
    return (z != 0).float().mean()


def _spatial(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean-removed atoms (M, C, k, k) and their per-atom variance (M,) (population, per channel,
    averaged over channels)."""
    w = weight.detach().float()
    centred = w - w.mean(dim=(2, 3), keepdim=True)
    return centred, centred.pow(2).mean(dim=(1, 2, 3))


@torch.no_grad()
def atom_roughness(weight: Tensor) -> Tensor:
    """Eq. (8) per atom (M,): NaN for flat atoms (no spatial variance to compare with)."""
    centred, var = _spatial(weight)
    dx = (centred[..., :, 1:] - centred[..., :, :-1]).pow(2)
    dy = (centred[..., 1:, :] - centred[..., :-1, :]).pow(2)
    neighbour = torch.cat([dx.flatten(1), dy.flatten(1)], dim=1).mean(dim=1)
    energy = weight.detach().float().pow(2).mean(dim=(1, 2, 3))
    flat = var < FLAT_ENERGY * energy
    return torch.where(flat, torch.full_like(var, float("nan")), neighbour / (2.0 * var.clamp_min(1e-20)))


@torch.no_grad()
def flat_fraction(weight: Tensor) -> Tensor:
    """Eq. (10): fraction of atoms with almost no spatial variation (0-dim)."""
    _, var = _spatial(weight)
    energy = weight.detach().float().pow(2).mean(dim=(1, 2, 3))
    return (var < FLAT_ENERGY * energy).float().mean()


@torch.no_grad()
def atom_drift(weight: Tensor, initial: Tensor) -> Tensor:
    """Eq. (9) per atom (M,): 1 − cos(a, a_init)."""
    a, b = weight.detach().float().flatten(1), initial.detach().float().to(weight.device).flatten(1)
    return 1.0 - torch.nn.functional.cosine_similarity(a, b, dim=1)


@torch.no_grad()
def chroma_fraction(weight: Tensor) -> Tensor:
    """Eq. (11) per atom (M,) for colour atoms (C = 3); for C = 1 all zeros."""
    w = weight.detach().float()
    chroma = w - w.mean(dim=1, keepdim=True)
    return chroma.pow(2).sum(dim=(1, 2, 3)) / w.pow(2).sum(dim=(1, 2, 3)).clamp_min(1e-20)


def dictionary_summary(weight: Tensor, initial: Tensor | None = None) -> dict[str, Tensor]:
    """Roughness (mean over non-flat atoms), flat fraction, chroma fraction (colour atoms) and drift (when
    ``initial`` is given) of one dictionary, as 0-dim tensors."""
    rough = atom_roughness(weight)
    out = {"roughness": torch.nanmean(rough), "flat_fraction": flat_fraction(weight)}
    if weight.shape[1] == 3:
        out["chroma_fraction"] = chroma_fraction(weight).mean()
    if initial is not None:
        out["drift"] = atom_drift(weight, initial).mean()
    return out
