"""Coding rate and rate reduction on Gram statistics (docs/method.md §4).

References: MCR² (Yu et al., NeurIPS 2020, eq. 5-7 / 11); CTRL (Dai et al., Entropy 2022, eq. 9-13);
CSC-CTRL (Dai et al., arXiv 2302.09347).

Notation (paper → code):

| Paper                        | Code                           | Note                                                 |
|------------------------------|--------------------------------|------------------------------------------------------|
| Z = [z₁ … z_n] ∈ ℝ^{d×n}     | ``z`` (n, d), rows are samples | the paper's Z Zᵀ is our ``z.T @ z`` (d × d)          |
| Ẑ = f(g(Z))                  | ``z_hat`` (n, d)               |                                                      |
| ε²                           | ``eps_sq``                     | the reference code's ``EPS = 0.5`` is ε² itself      |
| Πⱼ, class membership         | ``labels`` (n,) int in [0, k)  | one-hot weights built on the device, no (k, n, n)    |
| Z Zᵀ, Zⱼ Zⱼᵀ                 | ``gram``, ``grams`` (k, d, d)  | sums over samples: all-reducible across ranks        |
| n, nⱼ                        | ``n``, ``counts`` (k,)         | float tensors                                        |
| R, R_c, ΔR(Z|Π), ΔR(Z, Ẑ)    | ``coding_rate_from_gram``; the ΔR terms: models/ctrl.py ``ctrl_objective`` (the one implementation) |

Equations (α = d / (n ε²), αⱼ = d / (nⱼ ε²)):

    R(Z)      = ½ logdet(I_d + α Z Zᵀ)
    R_c(Z|Π)  = Σⱼ (nⱼ / n) · ½ logdet(I_d + αⱼ Zⱼ Zⱼᵀ)
    ΔR(Z|Π)   = R(Z) − R_c(Z|Π)
    ΔR(Z, Ẑ)  = R(Z ∪ Ẑ) − ½ R(Z) − ½ R(Ẑ),    Z ∪ Ẑ has Gram Z Zᵀ + Ẑ Ẑᵀ and 2n samples

Everything depends on z only through (gram, n), so the distributed trainer sums per-rank statistics before
the logdets and these functions never communicate. All logdets of one call go through one batched Cholesky
in ≥ fp32 with autocast off; nothing here synchronises host and device except ``check_labels``. Gram formulation only: the n < d
identity logdet(I_d + α ZZᵀ) = logdet(I_n + α ZᵀZ) needs the raw samples, which the all-reduced statistics
no longer hold.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor

# ----------------------------------------------------------------------------------------------
# Numerics: fp32 island, log-determinant
# ----------------------------------------------------------------------------------------------


def stat_dtype(t: Tensor) -> torch.dtype:
    """At least fp32 (bf16/fp16 inputs are upcast; fp64 stays fp64 for gradcheck)."""
    return torch.promote_types(t.dtype, torch.float32)


def autocast_off(t: Tensor) -> contextlib.AbstractContextManager:
    """Disable autocast on ``t``'s device type: the statistics and logdets run in ≥ fp32 even inside a
    bf16 autocast region of the networks."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def logdet_spd(m: Tensor) -> Tensor:
    """log det M = 2 Σᵢ log Lᵢᵢ with M = L Lᵀ (Cholesky), for symmetric positive-definite M (..., d, d).

    One batched ``torch.linalg.cholesky_ex`` call in ≥ fp32 with autocast off. The ``_ex`` variant is the
    Cholesky that does not check its status on the host (``linalg.cholesky`` synchronises the device to
    raise); a failed factorisation (a non-SPD or non-finite input) yields NaN for that matrix instead,
    which the trainer's non-finite check catches. Returns shape (...).
    """
    if m.dim() < 2 or m.shape[-1] != m.shape[-2]:
        raise ValueError(f"logdet_spd expects square matrices (..., d, d), got shape {tuple(m.shape)}")
    with autocast_off(m):
        chol, info = torch.linalg.cholesky_ex(m.to(stat_dtype(m)))
        logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        return torch.where(info == 0, logdet, torch.full_like(logdet, math.nan))


# ----------------------------------------------------------------------------------------------
# The math on sufficient statistics (gram, n)
# ----------------------------------------------------------------------------------------------


def coding_rate_from_gram(gram: Tensor, n: Tensor | float, eps_sq: float) -> Tensor:
    """R = ½ logdet(I_d + α G), α = d / (n ε²), batched over leading dimensions.

    gram: (..., d, d) = zᵀz for z (n, d) (per class: Σ over the class's rows); n: (...) sample counts,
    broadcast against the leading dimensions. A count of 0 is clamped to 1: its Gram is 0, so R =
    ½ logdet(I) = 0 (an empty class contributes nothing). Returns (...) in ≥ fp32. No host sync.
    """
    validate_eps_sq(eps_sq)
    if gram.dim() < 2 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"coding_rate_from_gram expects Gram matrices (..., d, d), got shape {tuple(gram.shape)}")
    dtype = stat_dtype(gram)
    d = gram.shape[-1]
    with autocast_off(gram):
        # A Python count becomes a device scalar by a fill, not a host-to-device copy.
        n = n.to(dtype) if isinstance(n, Tensor) else torch.full((), float(n), dtype=dtype, device=gram.device)
        alpha = d / (n.clamp(min=1.0) * eps_sq)  # α = d / (n ε²)
        eye = torch.eye(d, dtype=dtype, device=gram.device)
        return 0.5 * logdet_spd(eye + alpha[..., None, None] * gram.to(dtype))


def class_gram(z: Tensor, labels: Tensor, num_classes: int, tf32: bool = False) -> tuple[Tensor, Tensor]:
    """Per-class Gram matrices Zⱼ Zⱼᵀ = Σ_{i: labelᵢ = j} zᵢ zᵢᵀ and counts nⱼ.

    z: (n, d); labels: (n,) int in [0, k). Returns grams (k, d, d) and counts (k,), in ≥ fp32, from one-hot
    weights built on the device (no loop over classes, no host sync). A label outside [0, k) matches no
    class and its row is silently left out: hot-path callers validate once with ``check_labels``.

    tf32: on CUDA, form the products (forward and backward) on TF32 tensor cores: inputs rounded to 10
    mantissa bits, sums in fp32. The trainer asks for it when the networks run in bf16, whose features
    carry 8 mantissa bits to begin with; the logdets stay fp32. It is ~10x the fp32 rate, and the k
    one-hot-weighted Grams (2·n·k·d² multiply-adds, forward and backward) were the loss's largest cost.
    """
    validate_samples(z)
    validate_label_shape(labels, z.shape[0])
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    with autocast_off(z):
        z = z.to(stat_dtype(z))
        classes = torch.arange(num_classes, device=labels.device)
        onehot = (labels[:, None] == classes[None, :]).to(z.dtype)  # (n, k)
        return _ClassGram.apply(z, onehot, tf32 and z.is_cuda and z.dtype == torch.float32), onehot.sum(0)


@contextlib.contextmanager
def _tf32_matmul(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


class _ClassGram(torch.autograd.Function):
    """G_j = Σᵢ w_ij zᵢ zᵢᵀ for constant one-hot weights w (n, k), with an explicit backward so that both
    directions can run under the same matmul precision (``class_gram``'s tf32):

        forward:   G = (w ⊙ z)ᵀ z              (k, d, d)   one batched GEMM
        backward:  ∂L/∂zᵢ = Σ_j w_ij (Ḡ_j + Ḡ_jᵀ) zᵢ        one batched GEMM, weighted, summed over j
    """

    @staticmethod
    def forward(ctx, z: Tensor, onehot: Tensor, tf32: bool) -> Tensor:
        ctx.tf32 = tf32
        ctx.save_for_backward(z, onehot)
        weighted = onehot.T[:, :, None] * z[None]  # (k, n, d): row i of class j is w_ij zᵢ
        with _tf32_matmul(tf32):
            return weighted.transpose(1, 2) @ z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        z, onehot = ctx.saved_tensors
        sym = grad + grad.transpose(1, 2)  # (k, d, d)
        with _tf32_matmul(ctx.tf32):
            per_class = z[None] @ sym  # (k, n, d): zᵢᵀ (Ḡ_j + Ḡ_jᵀ) for every class j
        return (onehot.T[:, :, None] * per_class).sum(0), None, None


def check_labels(labels: Tensor, num_classes: int) -> None:
    """Raise ValueError unless labels is a 1-D integer tensor with values in [0, num_classes).
    CPU-GPU sync point (reads the minimum and maximum): call it outside the training step."""
    validate_label_shape(labels, labels.shape[0] if labels.dim() == 1 else -1)
    if labels.numel() == 0:
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got values in [{low}, {high}]")


# ----------------------------------------------------------------------------------------------
# Validation (shapes and dtypes only: no host sync)
# ----------------------------------------------------------------------------------------------


def validate_eps_sq(eps_sq: float) -> None:
    if not (isinstance(eps_sq, (int, float)) and math.isfinite(eps_sq) and eps_sq > 0):
        raise ValueError(f"eps_sq (ε²) must be a finite number > 0, got {eps_sq!r}")


def validate_samples(z: Tensor, name: str = "z") -> None:
    if not isinstance(z, Tensor) or z.dim() != 2 or not z.is_floating_point():
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"{name} must be a floating-point (n, d) tensor with samples as rows, got {shape}")


def validate_label_shape(labels: Tensor, n: int) -> None:
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != n:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a 1-D tensor of length {n} (one per row of z), got {shape}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must have an integer dtype, got {labels.dtype}")
