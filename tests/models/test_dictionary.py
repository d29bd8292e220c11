"""models/dictionary.py: the dictionary loss (eq. 5) and the atom/code measures (eq. 6-11), each against an
independent computation (an explicit synthesis matrix in float64, closed forms, naive loops)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.csc import CSCLayer
from models.dictionary import (atom_drift, atom_roughness, chroma_fraction, dictionary_loss, dictionary_summary,
                               flat_fraction, nonzero_fraction, relative_residual)


def explicit_synthesis_matrix(layer: CSCLayer, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, ...]]:
    """The matrix of z ↦ A z (columns = A applied to each unit code), built one column at a time."""
    with torch.no_grad():
        probe = layer.analyze(torch.zeros(1, layer.in_channels, *size, dtype=torch.float64))
        z_shape = tuple(probe.shape[1:])
        cols = []
        for i in range(int(np.prod(z_shape))):
            e = torch.zeros(int(np.prod(z_shape)), dtype=torch.float64)
            e[i] = 1.0
            cols.append(layer.synthesize(e.view(1, *z_shape), size).reshape(-1).numpy())
    return np.stack(cols, axis=1), z_shape


def test_dictionary_loss_is_the_relative_squared_residual_of_an_explicit_matrix():
    torch.manual_seed(0)
    layer = CSCLayer(2, 5, kernel_size=3, stride=2, padding=1).double()
    h = torch.randn(3, 2, 7, 7, dtype=torch.float64)
    z = torch.relu(torch.randn(3, 5, 4, 4, dtype=torch.float64))
    a, _ = explicit_synthesis_matrix(layer, (7, 7))
    hn, zn = h.reshape(3, -1).numpy(), z.reshape(3, -1).numpy()
    expected = ((hn - zn @ a.T) ** 2).sum() / (hn ** 2).sum()
    assert float(dictionary_loss(layer, h, z)) == pytest.approx(expected, rel=1e-5)  # computed in fp32
    assert float(relative_residual(layer, h, z)) == pytest.approx(math.sqrt(expected), rel=1e-5)


def test_dictionary_loss_moves_only_the_atoms():
    torch.manual_seed(1)
    layer = CSCLayer(1, 4, kernel_size=4, stride=2, padding=1)
    h = torch.randn(2, 1, 8, 8, requires_grad=True)
    z = torch.relu(torch.randn(2, 4, 4, 4)).requires_grad_(True)
    dictionary_loss(layer, h, z).backward()
    assert layer.weight.grad is not None and float(layer.weight.grad.abs().sum()) > 0
    assert h.grad is None and z.grad is None  # stop-gradient on the input and the codes


def test_dictionary_loss_gradient_step_lowers_the_residual():
    """One small gradient step on eq. (5) is the dictionary update of sparse coding: the residual drops."""
    torch.manual_seed(2)
    layer = CSCLayer(1, 8, kernel_size=4, stride=2, padding=1, n_steps=30, lam=0.01)
    h = torch.randn(4, 1, 16, 16)
    z = layer(h).detach()
    before = dictionary_loss(layer, h, z)
    before.backward()
    with torch.no_grad():
        layer.weight -= 1e-2 * layer.weight.grad
    assert float(dictionary_loss(layer, h, z)) < float(before)


def test_nonzero_fraction_counts_entries():
    z = torch.tensor([[0.0, 1.0], [0.0, -2.0], [0.0, 0.0]])
    assert float(nonzero_fraction(z)) == pytest.approx(2 / 6)


def test_roughness_closed_forms():
    ramp = torch.arange(4.0).repeat(4, 1)[None, None]  # a[i, j] = j: horizontal ramp
    # mean-removed values ±0.5, ±1.5: variance 1.25; 12 horizontal differences of 1, 12 vertical of 0
    assert float(atom_roughness(ramp)[0]) == pytest.approx(0.5 / (2 * 1.25))
    checker = (torch.arange(4.0)[:, None] + torch.arange(4.0)[None, :]) % 2  # every neighbour differs by 1
    assert float(atom_roughness(checker[None, None])[0]) == pytest.approx(1.0 / (2 * 0.25))
    flat = torch.ones(1, 3, 4, 4)
    assert math.isnan(float(atom_roughness(flat)[0]))


def test_roughness_of_iid_noise_is_one_up_to_the_sample_variance_factor():
    torch.manual_seed(3)
    noise = torch.randn(20000, 1, 4, 4)
    # E[(a_p − a_q)²] = 2σ²; the mean-removed sample variance of 16 values has expectation (15/16)σ²
    assert float(torch.nanmean(atom_roughness(noise))) == pytest.approx(16 / 15, rel=0.02)


def test_drift_flat_and_chroma():
    torch.manual_seed(4)
    w = torch.randn(6, 3, 4, 4)
    assert torch.allclose(atom_drift(w, w), torch.zeros(6), atol=1e-6)
    assert torch.allclose(atom_drift(-w, w), torch.full((6,), 2.0), atol=1e-6)
    a, b = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    a[0, 0, 0, 0], b[0, 0, 1, 1] = 1.0, 1.0
    assert float(atom_drift(a, b)[0]) == pytest.approx(1.0)  # orthogonal atoms
    grey = torch.randn(5, 1, 4, 4).expand(5, 3, 4, 4)
    assert torch.allclose(chroma_fraction(grey), torch.zeros(5), atol=1e-6)
    colour_noise = torch.randn(20000, 3, 4, 4)
    assert float(chroma_fraction(colour_noise).mean()) == pytest.approx(2 / 3, rel=0.02)
    mixed = torch.cat([torch.ones(3, 3, 4, 4) * torch.tensor([1.0, -2.0, 0.5])[:, None, None], torch.randn(1, 3, 4, 4)])
    assert float(flat_fraction(mixed)) == pytest.approx(3 / 4)
    summary = dictionary_summary(w, w)
    assert set(summary) == {"roughness", "flat_fraction", "chroma_fraction", "drift"}
    assert "chroma_fraction" not in dictionary_summary(torch.randn(4, 1, 4, 4))
