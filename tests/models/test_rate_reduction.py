"""Rate reduction against a float64 numpy transcription of the formulas, identities and invariances,
numerics (fp32 island under bf16 autocast, Cholesky vs torch.logdet), gradients, and input errors.

R, R_c, ΔR(Z|Π) and ΔR(Z, Ẑ) are read off the one implementation the trainer uses (models/ctrl.py:
``ctrl_statistics`` then ``ctrl_objective``); the helpers below only pick its terms."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.ctrl import CTRLTerms, ctrl_objective, ctrl_statistics
from models.rate_reduction import check_labels, class_gram, coding_rate_from_gram, logdet_spd

EPS_SQ = 0.5  # ε² of the experiment config's default


# ---- the terms of the trainer's objective (models/ctrl.py), for samples z (n, d) ----

def binary_terms(z: torch.Tensor, z_hat: torch.Tensor, eps_sq: float) -> CTRLTerms:
    return ctrl_objective(ctrl_statistics(z, z_hat, None, 1, "binary"), "binary", eps_sq)


def class_terms(z: torch.Tensor, labels: torch.Tensor, eps_sq: float, num_classes: int | None) -> CTRLTerms:
    k = num_classes if num_classes is not None else int(labels.max()) + 1 if labels.dim() == 1 and labels.numel() else 1
    stats = ctrl_statistics(z, z, labels, k, "multiclass")
    check_labels(labels, k)
    return ctrl_objective(stats, "multiclass", eps_sq)


def coding_rate(z: torch.Tensor, eps_sq: float = EPS_SQ) -> torch.Tensor:
    """R(Z)"""
    return binary_terms(z, z, eps_sq).rate_z


def rate_reduction(z: torch.Tensor, labels: torch.Tensor, eps_sq: float = EPS_SQ,
                   num_classes: int | None = None) -> torch.Tensor:
    """ΔR(Z|Π)"""
    return class_terms(z, labels, eps_sq, num_classes).delta_r_z


def class_coding_rate(z: torch.Tensor, labels: torch.Tensor, eps_sq: float = EPS_SQ,
                      num_classes: int | None = None) -> torch.Tensor:
    """R_c(Z|Π) = R(Z) − ΔR(Z|Π)"""
    t = class_terms(z, labels, eps_sq, num_classes)
    return t.rate_z - t.delta_r_z


def pair_rate_reduction(z: torch.Tensor, z_hat: torch.Tensor, eps_sq: float = EPS_SQ) -> torch.Tensor:
    """ΔR(Z, Ẑ)"""
    return binary_terms(z, z_hat, eps_sq).delta_r_z_zhat


def gram(z: torch.Tensor) -> torch.Tensor:
    return z.T @ z


# ---- independent float64 transcription (the paper's notation: Z is d × n, columns are samples) ----

def np_rate(z_rows: np.ndarray, eps_sq: float) -> float:
    """R(Z) = ½ logdet(I + d/(n ε²) Z Zᵀ)"""
    big_z = z_rows.T
    d, n = big_z.shape
    return 0.5 * np.linalg.slogdet(np.eye(d) + d / (n * eps_sq) * big_z @ big_z.T)[1]


def np_class_rate(z_rows: np.ndarray, labels: np.ndarray, eps_sq: float, k: int) -> float:
    """R_c(Z|Π) = Σⱼ (nⱼ/n) ½ logdet(I + d/(nⱼ ε²) Zⱼ Zⱼᵀ)"""
    n = len(labels)
    return sum(np.sum(labels == j) / n * np_rate(z_rows[labels == j], eps_sq) for j in range(k) if np.any(labels == j))


def np_pair(z_rows: np.ndarray, zh_rows: np.ndarray, eps_sq: float) -> float:
    """R(Z ∪ Ẑ) − ½R(Z) − ½R(Ẑ)"""
    union = np.concatenate([z_rows, zh_rows])
    return np_rate(union, eps_sq) - 0.5 * np_rate(z_rows, eps_sq) - 0.5 * np_rate(zh_rows, eps_sq)


def sphere(n: int, d: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype), dim=1)


def labels_of(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,d,k,eps_sq", [(40, 8, 3, 0.5), (10, 16, 4, 0.1), (64, 5, 2, 2.0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_match_numpy_transcription(n, d, k, eps_sq, dtype):
    z, z_hat, labels = sphere(n, d, 0, dtype), sphere(n, d, 1, dtype), labels_of(n, k, 2)
    zn, zhn, ln = z.double().numpy(), z_hat.double().numpy(), labels.numpy()
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    r, rc = np_rate(zn, eps_sq), np_class_rate(zn, ln, eps_sq, k)
    assert coding_rate(z, eps_sq).item() == pytest.approx(r, rel=rtol)
    assert class_coding_rate(z, labels, eps_sq, k).item() == pytest.approx(rc, rel=rtol)
    assert rate_reduction(z, labels, eps_sq, k).item() == pytest.approx(r - rc, rel=rtol * 10, abs=1e-6)
    assert pair_rate_reduction(z, z_hat, eps_sq).item() == pytest.approx(np_pair(zn, zhn, eps_sq), rel=rtol * 10,
                                                                         abs=1e-6)
    for value in (coding_rate(z, eps_sq), rate_reduction(z, labels, eps_sq, k)):
        assert value.dtype == dtype  # ≥ fp32: fp64 stays fp64


def test_default_eps_sq_is_one_half():
    z = sphere(20, 6, 3)
    assert coding_rate(z).item() == pytest.approx(np_rate(z.numpy(), 0.5), rel=1e-12)


def test_rate_reductions_are_nonnegative():
    for seed in range(5):
        z, z_hat = sphere(30, 6, seed), sphere(30, 6, seed + 100)
        labels = labels_of(30, 1 + seed % 4, seed)
        assert rate_reduction(z, labels).item() >= -1e-12  # concavity of logdet
        assert pair_rate_reduction(z, z_hat).item() >= -1e-12
    z = sphere(30, 6, 7)
    assert pair_rate_reduction(z, z).item() == pytest.approx(0.0, abs=1e-12)  # identical sets: R(Z ∪ Z) = R(Z)
    single = torch.zeros(30, dtype=torch.long)
    assert rate_reduction(z, single).item() == pytest.approx(0.0, abs=1e-12)  # one class: R_c = R


def test_invariance_to_orthogonal_rotation():
    z, z_hat, labels = sphere(25, 7, 0), sphere(25, 7, 1), labels_of(25, 3, 2)
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    for fn in (coding_rate, lambda a: class_coding_rate(a, labels), lambda a: rate_reduction(a, labels)):
        assert fn(z @ q).item() == pytest.approx(fn(z).item(), rel=1e-10)
    assert pair_rate_reduction(z @ q, z_hat @ q).item() == pytest.approx(pair_rate_reduction(z, z_hat).item(),
                                                                         rel=1e-10)


def test_union_by_gram_addition_equals_concatenation():
    z, z_hat = sphere(12, 9, 0), sphere(12, 9, 1)
    from_gram = coding_rate_from_gram(gram(z) + gram(z_hat), torch.tensor(24.0, dtype=torch.float64), 0.5)
    assert from_gram.item() == pytest.approx(coding_rate(torch.cat([z, z_hat])).item(), rel=1e-12)


def test_class_gram_matches_per_class_sums():
    z, labels = sphere(30, 5, 0), labels_of(30, 4, 1)
    grams, counts = class_gram(z, labels, 6)  # classes 4 and 5 are empty
    for j in range(6):
        rows = z[labels == j]
        assert torch.allclose(grams[j], rows.T @ rows, atol=1e-12)
        assert counts[j].item() == len(rows)
    assert counts[4:].sum().item() == 0 and grams[4:].abs().sum().item() == 0


def test_coding_rate_from_gram_batched_and_empty_counts():
    z1, z2 = sphere(10, 4, 0), sphere(7, 4, 1)
    grams = torch.stack([gram(z1), gram(z2), torch.zeros(4, 4, dtype=torch.float64)])
    rates = coding_rate_from_gram(grams, torch.tensor([10.0, 7.0, 0.0], dtype=torch.float64), 0.5)
    assert rates.shape == (3,)
    assert rates[0].item() == pytest.approx(np_rate(z1.numpy(), 0.5), rel=1e-12)
    assert rates[1].item() == pytest.approx(np_rate(z2.numpy(), 0.5), rel=1e-12)
    assert rates[2].item() == 0.0  # an empty class: n clamped to 1, G = 0, logdet(I) = 0


def test_empty_class_is_finite_and_ignored():
    z, labels = sphere(20, 6, 0), labels_of(20, 2, 1) * 2  # labels in {0, 2}; class 1 is empty
    with_empty = rate_reduction(z, labels, num_classes=3)
    assert torch.isfinite(with_empty)
    assert with_empty.item() == pytest.approx(rate_reduction(z, labels // 2, num_classes=2).item(), rel=1e-12)


def test_class_gram_gradient_matches_a_naive_computation():
    """The explicit backward of the one-GEMM class Gram against autograd through per-class loops of
    zᵢ zᵢᵀ outer products (float64), including an out-of-range label that belongs to no class."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(13, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 7, 0])
    weights = torch.randn(3, 5, 5, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((class_gram(z, labels, 3)[0] * weights).sum(), z)
    zr = z.detach().clone().requires_grad_()
    naive = torch.stack([sum((torch.outer(zr[i], zr[i]) for i in range(13) if labels[i] == j),
                             torch.zeros(5, 5, dtype=torch.float64)) for j in range(3)])
    (expected,) = torch.autograd.grad((naive * weights).sum(), zr)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    assert torch.all(grad[11] == 0)  # label 7 is in no class
    assert torch.autograd.gradcheck(lambda t: class_gram(t, labels, 3)[0], (z.detach().clone().requires_grad_(),))


def test_logdet_spd_matches_torch_logdet():
    a = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    spd = a @ a.transpose(-1, -2) + 0.1 * torch.eye(6, dtype=torch.float64)
    assert torch.allclose(logdet_spd(spd), torch.logdet(spd), rtol=1e-12)
    low = logdet_spd(spd.to(torch.bfloat16))
    assert low.dtype == torch.float32  # low-precision input is upcast
    assert torch.allclose(low.double(), torch.logdet(spd.to(torch.bfloat16).double()), rtol=1e-5)
    not_spd = -torch.eye(3, dtype=torch.float64)
    assert torch.isnan(logdet_spd(not_spd))  # failure shows up as NaN, without a host sync


def test_logdet_spd_gradient_is_the_inverse():
    """The custom backward (g · M⁻¹ from the saved Cholesky factor) against numpy's inverse in float64,
    against torch.logdet's autograd, and by finite differences (gradcheck on a symmetric parametrisation)."""
    a = torch.randn(4, 7, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    spd = (a @ a.transpose(-1, -2) + 0.5 * torch.eye(7, dtype=torch.float64)).requires_grad_()
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    (grad,) = torch.autograd.grad((weights * logdet_spd(spd)).sum(), spd)
    expected = weights.numpy()[:, None, None] * np.linalg.inv(spd.detach().numpy())
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-10, atol=1e-12)
    (reference,) = torch.autograd.grad((weights * torch.logdet(spd)).sum(), spd)
    torch.testing.assert_close(grad, reference, rtol=1e-10, atol=1e-12)
    base = spd.detach()
    assert torch.autograd.gradcheck(lambda s: logdet_spd(base + s + s.transpose(-1, -2)),
                                    (torch.zeros_like(base).requires_grad_(),))


def test_fp32_under_bf16_autocast():
    z = sphere(50, 16, 0, torch.float32)
    labels = labels_of(50, 4, 1)
    reference = {"r": coding_rate(z), "dr": rate_reduction(z, labels, num_classes=4),
                 "pair": pair_rate_reduction(z, z.flip(0)), "gram": class_gram(z, labels, 4)[0]}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = {"r": coding_rate(z), "dr": rate_reduction(z, labels, num_classes=4),
                  "pair": pair_rate_reduction(z, z.flip(0)), "gram": class_gram(z, labels, 4)[0]}
        # a bf16 matmul here would be off by ~1e-2 relative
        assert (z.T @ z).dtype == torch.bfloat16
    for key, value in inside.items():
        assert value.dtype == torch.float32, key
        assert torch.allclose(value, reference[key], rtol=1e-6, atol=1e-6), key
    bf16 = coding_rate(z.to(torch.bfloat16))
    assert bf16.dtype == torch.float32


def test_gradcheck_float64():
    z0, zh0, labels = sphere(8, 4, 0), sphere(8, 4, 1), labels_of(8, 3, 2)
    z = z0.clone().requires_grad_(True)
    z_hat = zh0.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: coding_rate(F.normalize(a, dim=1)), (z,))
    assert torch.autograd.gradcheck(lambda a: rate_reduction(F.normalize(a, dim=1), labels, 0.5, 3), (z,))
    assert torch.autograd.gradcheck(lambda a, b: pair_rate_reduction(a, b, 0.3), (z, z_hat))


@pytest.mark.parametrize("call,match", [
    (lambda: coding_rate(sphere(5, 3, 0), eps_sq=0.0), "eps_sq"),
    (lambda: coding_rate(sphere(5, 3, 0), eps_sq=-1.0), "eps_sq"),
    (lambda: coding_rate(sphere(5, 3, 0), eps_sq=float("nan")), "eps_sq"),
    (lambda: coding_rate(torch.zeros(5)), r"\(n, d\)"),
    (lambda: coding_rate(torch.zeros(2, 5, 3)), r"\(n, d\)"),
    (lambda: coding_rate(torch.zeros(5, 3, dtype=torch.long)), "floating-point"),
    (lambda: rate_reduction(sphere(5, 3, 0), torch.zeros(4, dtype=torch.long)), "length 5"),
    (lambda: rate_reduction(sphere(5, 3, 0), torch.zeros(5, 1, dtype=torch.long)), "1-D"),
    (lambda: rate_reduction(sphere(5, 3, 0), torch.zeros(5)), "integer dtype"),
    (lambda: rate_reduction(sphere(5, 3, 0), torch.tensor([0, 1, 2, 3, 4]), num_classes=3), r"in \[0, 3\)"),
    (lambda: rate_reduction(sphere(5, 3, 0), torch.tensor([0, -1, 2, 0, 0])), r"got values in \[-1, 2\]"),
    (lambda: class_gram(sphere(5, 3, 0), torch.zeros(5, dtype=torch.long), 0), "num_classes"),
    (lambda: pair_rate_reduction(sphere(5, 3, 0), sphere(4, 3, 1)), "same shape"),
    (lambda: logdet_spd(torch.zeros(3, 4)), "square"),
    (lambda: coding_rate_from_gram(torch.zeros(3, 4), 3.0, 0.5), r"\(\.\.\., d, d\)"),
    (lambda: check_labels(torch.tensor([0, 5]), 5), r"in \[0, 5\)"),
])
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
