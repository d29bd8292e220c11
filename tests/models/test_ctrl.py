"""CTRL objective: terms against a float64 numpy transcription, closed forms, additivity of the statistics
(split batch = global batch, the property the distributed trainer relies on), one batched Cholesky per
call, gradients, autocast, and input errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.ctrl import CTRLStats, CTRLTerms, ctrl_objective, ctrl_statistics

EPS_SQ = 0.5


def np_rate(rows: np.ndarray, eps_sq: float) -> float:
    d, n = rows.shape[1], rows.shape[0]
    if n == 0:
        return 0.0
    return 0.5 * np.linalg.slogdet(np.eye(d) + d / (n * eps_sq) * rows.T @ rows)[1]


def np_terms(z: np.ndarray, zh: np.ndarray, labels: np.ndarray, k: int, eps_sq: float) -> dict[str, float]:
    """CTRL (Entropy 2022) eq. 13-15, transcribed from the definitions on the samples themselves."""
    n = len(z)

    def rc(rows):
        return sum(np.sum(labels == j) / n * np_rate(rows[labels == j], eps_sq) for j in range(k))

    def pair(a, b):
        return np_rate(np.concatenate([a, b]), eps_sq) - 0.5 * np_rate(a, eps_sq) - 0.5 * np_rate(b, eps_sq)

    return {
        "delta_r_z": np_rate(z, eps_sq) - rc(z),
        "delta_r_zhat": np_rate(zh, eps_sq) - rc(zh),
        "delta_r_pairs": sum(pair(z[labels == j], zh[labels == j]) for j in range(k)),
        "delta_r_z_zhat": pair(z, zh),
        "rate_z": np_rate(z, eps_sq),
        "consistency": float(np.sum(1.0 - np.sum(z * zh, axis=1))),
    }


def batch(n: int = 24, d: int = 6, k: int = 3, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    z_hat = F.normalize(z + 0.7 * torch.randn(n, d, generator=g, dtype=dtype), dim=1)
    labels = torch.randint(0, k, (n,), generator=g)
    return z, z_hat, labels


def terms_of(z, z_hat, labels, k, mode, eps_sq=EPS_SQ, rate_weight=0.0) -> CTRLTerms:
    return ctrl_objective(ctrl_statistics(z, z_hat, labels, k, mode), mode, eps_sq, rate_weight)


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps_sq", [0.5, 0.2])
def test_terms_match_numpy_transcription(eps_sq):
    z, z_hat, labels = batch()
    expected = np_terms(z.numpy(), z_hat.numpy(), labels.numpy(), 3, eps_sq)
    multi = terms_of(z, z_hat, labels, 3, "multiclass", eps_sq)
    for name in ("delta_r_z", "delta_r_zhat", "delta_r_pairs", "rate_z", "consistency"):
        assert getattr(multi, name).item() == pytest.approx(expected[name], rel=1e-10), name
    assert multi.objective.item() == pytest.approx(
        expected["delta_r_z"] + expected["delta_r_zhat"] + expected["delta_r_pairs"], rel=1e-10)
    assert multi.delta_r_z_zhat is None
    binary = terms_of(z, z_hat, None, 1, "binary", eps_sq)
    assert binary.delta_r_z_zhat.item() == pytest.approx(expected["delta_r_z_zhat"], rel=1e-10)
    assert binary.objective.item() == pytest.approx(expected["delta_r_z_zhat"], rel=1e-10)
    assert binary.rate_z.item() == pytest.approx(expected["rate_z"], rel=1e-10)
    assert binary.delta_r_z is None and binary.delta_r_pairs is None


def test_binary_ignores_labels():
    z, z_hat, labels = batch()
    with_labels = terms_of(z, z_hat, labels, 1, "binary")
    without = terms_of(z, z_hat, None, 1, "binary")
    assert with_labels.objective.item() == without.objective.item()


def test_rate_weight_adds_rate_of_z():
    z, z_hat, labels = batch()
    for mode, k in (("binary", 1), ("multiclass", 3)):
        plain, weighted = terms_of(z, z_hat, labels, k, mode), terms_of(z, z_hat, labels, k, mode, rate_weight=0.3)
        assert weighted.objective.item() == pytest.approx(plain.objective.item() + 0.3 * plain.rate_z.item(),
                                                          rel=1e-12)


def test_perfect_transcription_closed_forms():
    """Ẑ = Z: R(Z ∪ Z) = R(Z) (Gram 2G with 2n samples), so every pair term is 0, ΔR(Ẑ|Π) = ΔR(Z|Π),
    and the consistency is 0."""
    z, _, labels = batch()
    binary = terms_of(z, z, None, 1, "binary")
    assert binary.objective.item() == pytest.approx(0.0, abs=1e-12)
    assert binary.consistency.item() == pytest.approx(0.0, abs=1e-12)
    multi = terms_of(z, z, labels, 3, "multiclass")
    assert multi.delta_r_pairs.item() == pytest.approx(0.0, abs=1e-12)
    assert multi.delta_r_zhat.item() == pytest.approx(multi.delta_r_z.item(), rel=1e-12)


@pytest.mark.parametrize("mode,k", [("binary", 1), ("multiclass", 3)])
def test_split_batch_statistics_sum_to_global_batch(mode, k):
    """Two 'ranks' with half the batch each: summing their flat statistics gives the same objective and
    the same gradients as one rank with the whole batch (what the trainer's single all-reduce relies on)."""
    z0, zh0, labels = batch(n=20, k=k)

    def grads(split: bool):
        z, z_hat = z0.clone().requires_grad_(True), zh0.clone().requires_grad_(True)
        if split:
            parts = [ctrl_statistics(z[s], z_hat[s], labels[s], k, mode) for s in (slice(0, 9), slice(9, 20))]
            flat = parts[0].to_flat() + parts[1].to_flat()
            stats = CTRLStats.from_flat(flat, k, z.shape[1])
        else:
            stats = ctrl_statistics(z, z_hat, labels, k, mode)
        terms = ctrl_objective(stats, mode, EPS_SQ)
        (terms.objective + 0.1 * terms.consistency).backward()
        return terms.objective.detach(), z.grad, z_hat.grad

    whole, split = grads(False), grads(True)
    for a, b in zip(whole, split):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_flat_round_trip_and_size_check():
    z, z_hat, labels = batch(k=4)
    stats = ctrl_statistics(z, z_hat, labels, 4, "multiclass")
    flat = stats.to_flat()
    assert flat.shape == (2 * 4 * 6 * 6 + 4 + 1,)
    back = CTRLStats.from_flat(flat, 4, 6)
    for name in ("gram_z", "gram_zhat", "counts", "consistency_sum"):
        assert torch.equal(getattr(back, name), getattr(stats, name)), name
    assert back.num_classes == 4 and back.dim == 6
    with pytest.raises(ValueError, match=r"2·k·d² \+ k \+ 1 = 293"):
        CTRLStats.from_flat(flat[:-1], 4, 6)


@pytest.mark.parametrize("mode,k,expected_batch", [("binary", 1, 3), ("multiclass", 4, 2 + 3 * 4)])
def test_one_batched_cholesky_per_call(monkeypatch, mode, k, expected_batch):
    calls = []
    real = torch.linalg.cholesky_ex

    def spy(a, *args, **kwargs):
        calls.append(tuple(a.shape))
        return real(a, *args, **kwargs)

    z, z_hat, labels = batch(k=k)
    stats = ctrl_statistics(z, z_hat, labels, k, mode)
    monkeypatch.setattr(torch.linalg, "cholesky_ex", spy)
    ctrl_objective(stats, mode, EPS_SQ)
    assert calls == [(expected_batch, 6, 6)]


def test_empty_class_is_finite_and_changes_nothing():
    z, z_hat, labels = batch(k=2)
    spread = labels * 2  # classes {0, 2} of 3; class 1 has no sample
    with_empty = terms_of(z, z_hat, spread, 3, "multiclass")
    compact = terms_of(z, z_hat, labels, 2, "multiclass")
    for name, value in with_empty.as_dict().items():
        assert torch.isfinite(value), name
        assert value.item() == pytest.approx(getattr(compact, name).item(), rel=1e-12), name


@pytest.mark.parametrize("mode,k", [("binary", 1), ("multiclass", 3)])
def test_gradcheck_through_z(mode, k):
    z0, zh0, labels = batch(n=9, d=4, k=k, seed=1)

    def objective(z, z_hat):
        terms = terms_of(F.normalize(z, dim=1), F.normalize(z_hat, dim=1), labels, k, mode, rate_weight=0.2)
        return terms.objective + 0.5 * terms.consistency

    assert torch.autograd.gradcheck(objective, (z0.clone().requires_grad_(True), zh0.clone().requires_grad_(True)))


def test_statistics_are_fp32_under_bf16_autocast():
    z, z_hat, labels = batch(n=40, d=16, dtype=torch.float32)
    reference = terms_of(z, z_hat, labels, 3, "multiclass")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = ctrl_statistics(z, z_hat, labels, 3, "multiclass")
        inside = ctrl_objective(stats, "multiclass", EPS_SQ)
    assert stats.gram_z.dtype == torch.float32
    for name, value in inside.as_dict().items():
        assert value.dtype == torch.float32, name
        assert value.item() == pytest.approx(getattr(reference, name).item(), rel=1e-5, abs=1e-6), name
    bf16 = ctrl_statistics(z.to(torch.bfloat16), z_hat.to(torch.bfloat16), labels, 3, "multiclass")
    assert bf16.gram_z.dtype == torch.float32  # bf16 network outputs are upcast


def test_as_dict_names_and_detached_values():
    z, z_hat, labels = batch()
    z.requires_grad_(True)
    assert set(terms_of(z, z_hat, None, 1, "binary").as_dict()) == {
        "objective", "consistency", "rate_z", "delta_r_z_zhat"}
    multi = terms_of(z, z_hat, labels, 3, "multiclass").as_dict()
    assert set(multi) == {"objective", "consistency", "rate_z", "delta_r_z", "delta_r_zhat", "delta_r_pairs"}
    assert all(not v.requires_grad and v.dim() == 0 for v in multi.values())


@pytest.mark.parametrize("call,match", [
    (lambda z, zh, y: ctrl_statistics(z, zh, y, 3, "pairs"), "mode must be one of"),
    (lambda z, zh, y: ctrl_statistics(z, zh[:5], y, 3, "multiclass"), "same shape"),
    (lambda z, zh, y: ctrl_statistics(z, zh, None, 3, "multiclass"), "needs labels"),
    (lambda z, zh, y: ctrl_statistics(z, zh, y[:5], 3, "multiclass"), "length 24"),
    (lambda z, zh, y: ctrl_statistics(z[0], zh[0], y, 3, "binary"), r"\(n, d\)"),
    (lambda z, zh, y: ctrl_objective(ctrl_statistics(z, zh, y, 3, "multiclass"), "binary", EPS_SQ), "k = 1"),
    (lambda z, zh, y: ctrl_objective(ctrl_statistics(z, zh, y, 1, "binary"), "binary", 0.0), "eps_sq"),
    (lambda z, zh, y: ctrl_objective(ctrl_statistics(z, zh, y, 1, "binary"), "binary", EPS_SQ, -1.0), "rate_weight"),
])
def test_bad_inputs_raise_clear_errors(call, match):
    z, z_hat, labels = batch()
    with pytest.raises(ValueError, match=match):
        call(z, z_hat, labels)
