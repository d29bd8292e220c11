"""CSC layer: adjoint, output sizes, convergence to independent solvers (scikit-learn, numpy least
squares), the exact unrolled iteration against a float64 numpy transcription, power iteration against
explicit singular values, FISTA/ISTA objective bounds, and dictionary refresh semantics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import ElasticNet, Lasso

from models.csc import (STEP_SIZE_FACTOR, CSCLayer, SynthesisLayer, check_finite, code_size, output_padding,
                        refresh_dictionaries)

# (in_channels, num_atoms, kernel, stride, padding, height, width); odd and non-square sizes included
GEOMETRIES = [
    (1, 2, 3, 1, 0, 6, 6),
    (2, 3, 3, 2, 1, 7, 7),
    (2, 3, 4, 2, 1, 7, 9),
    (3, 4, 4, 2, 1, 16, 16),
    (3, 5, 5, 3, 2, 11, 10),
    (4, 3, 4, 1, 0, 4, 4),  # the encoder's final valid-kernel stage: → 1×1
    (1, 3, 3, 1, 1, 9, 9),
]


def make_layer(c: int, m: int, k: int, s: int, p: int, seed: int = 0, **kwargs) -> CSCLayer:
    torch.manual_seed(seed)
    layer = CSCLayer(c, m, k, s, p, **kwargs).double()
    layer.refresh()  # unit norm in float64 (the float32 init is unit only to ~1e-7)
    return layer


def explicit_matrix(layer: CSCLayer, size: tuple[int, int]) -> np.ndarray:
    """The matrix of A (pixels × code entries), column i = synthesize(unit code eᵢ)."""
    hz, wz = code_size(size, layer.kernel_size, layer.stride, layer.padding)
    n_code = layer.num_atoms * hz * wz
    units = torch.eye(n_code, dtype=torch.float64).view(n_code, layer.num_atoms, hz, wz)
    with torch.no_grad():
        columns = layer.synthesize(units, size).reshape(n_code, -1)
    return columns.numpy().T.copy()


def top_eig(a: np.ndarray) -> float:
    return float(np.linalg.svd(a, compute_uv=False)[0] ** 2)


def objective(a: np.ndarray, x: np.ndarray, z: np.ndarray, lam: float, mu: float) -> float:
    """λ‖z‖₁ + (μ/2)‖z‖₂² + ½‖x − A z‖₂²"""
    return lam * np.abs(z).sum() + 0.5 * mu * (z ** 2).sum() + 0.5 * ((x - a @ z) ** 2).sum()


# ----------------------------------------------------------------------------------------------
# The operator
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_adjoint_and_exact_output_size(geometry):
    c, m, k, s, p, h, w = geometry
    layer = make_layer(c, m, k, s, p)
    gen = torch.Generator().manual_seed(1)
    r = torch.randn(2, c, h, w, generator=gen, dtype=torch.float64)
    z = torch.randn(2, m, *code_size((h, w), k, s, p), generator=gen, dtype=torch.float64)
    with torch.no_grad():
        az = layer.synthesize(z, (h, w))
        atr = layer.analyze(r)
    assert az.shape == r.shape  # A maps a code back to exactly x's size
    assert atr.shape == z.shape
    lhs, rhs = (az * r).sum().item(), (z * atr).sum().item()
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)


def test_output_padding_formula_and_errors():
    # o = H − ((H_z − 1)s − 2p + k): 7 px, k4 s2 p1 → H_z = 3, base 6, o = 1
    assert code_size(7, 4, 2, 1) == (3, 3)
    assert output_padding((3, 3), (7, 6), 4, 2, 1) == (1, 0)
    with pytest.raises(ValueError, match=r"must be in \[6, 7\]"):
        output_padding((3, 3), (8, 8), 4, 2, 1)
    with pytest.raises(ValueError, match="output_padding"):
        output_padding((4, 4), (5, 5), 4, 1, 0)  # stride 1 allows only o = 0
    layer = make_layer(2, 3, 4, 2, 1)
    with pytest.raises(ValueError, match="cannot synthesize"):
        layer.synthesize(torch.zeros(1, 3, 3, 3, dtype=torch.float64), 9)


# ----------------------------------------------------------------------------------------------
# The unrolled iteration, exactly
# ----------------------------------------------------------------------------------------------


def numpy_unrolled(a: np.ndarray, x: np.ndarray, lam: float, mu: float, eta: float, n: int, nonneg: bool,
                   fista: bool) -> np.ndarray:
    """docs/method.md §2 transcribed in float64 on the explicit matrix."""

    def prox(u):
        v = np.sign(u) * np.maximum(np.abs(u) - lam * eta, 0.0) / (1.0 + mu * eta)
        return np.maximum(v, 0.0) if nonneg else v

    z = prox(eta * a.T @ x)
    z_prev, t = z, 1.0
    for _ in range(n - 1):
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        y = z + ((t - 1) / t_next if fista else 0.0) * (z - z_prev)
        z_prev, z = z, prox(y + eta * a.T @ (x - a @ y))
        t = t_next
    return z


@pytest.mark.parametrize("solver", ["fista", "ista"])
@pytest.mark.parametrize("nonneg,mu", [(True, 0.0), (False, 0.0), (True, 0.3), (False, 0.3)])
def test_unrolled_steps_match_numpy_transcription(solver, nonneg, mu):
    c, m, k, s, p, h, w = 2, 3, 4, 2, 1, 7, 9
    layer = make_layer(c, m, k, s, p, lam=0.5, mu=mu, nonneg=nonneg, solver=solver)
    x = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a = explicit_matrix(layer, (h, w))
    for n in (1, 2, 3, 4, 6):
        layer.n_steps = n
        with torch.no_grad():
            z = layer(x).numpy().ravel()
        eta = STEP_SIZE_FACTOR / layer.lipschitz.item()
        expected = numpy_unrolled(a, x.numpy().ravel(), 0.5, mu, eta, n, nonneg, solver == "fista")
        np.testing.assert_allclose(z, expected, rtol=1e-10, atol=1e-12)
    assert (z == 0).any() and (z != 0).any()  # the shrinkage is active
    if nonneg:
        assert (z >= 0).all()
    else:
        assert (z < 0).any()


# ----------------------------------------------------------------------------------------------
# Convergence to independent solvers
# ----------------------------------------------------------------------------------------------


def sklearn_solution(a: np.ndarray, target: np.ndarray, lam: float, mu: float, nonneg: bool) -> np.ndarray:
    """scikit-learn minimises 1/(2P)‖x − A z‖² + α·r‖z‖₁ + ½α(1 − r)‖z‖² (P pixels); × P gives our
    program with λ = P·α·r and μ = P·α·(1 − r)."""
    n_pixels = a.shape[0]
    if mu == 0:
        ref = Lasso(alpha=lam / n_pixels, fit_intercept=False, positive=nonneg, tol=1e-12, max_iter=100_000)
    else:
        ref = ElasticNet(alpha=(lam + mu) / n_pixels, l1_ratio=lam / (lam + mu), fit_intercept=False,
                         positive=nonneg, tol=1e-12, max_iter=100_000)
    return ref.fit(a, target).coef_


@pytest.mark.parametrize("geometry,nonneg,mu", [
    ((1, 2, 3, 1, 0, 6, 6), True, 0.0),   # 32 code entries, 36 pixels, rank-deficient A
    ((1, 3, 3, 2, 1, 6, 6), False, 0.0),  # stride 2 with output padding
    ((2, 2, 3, 2, 1, 6, 6), True, 0.2),   # elastic net
    ((1, 2, 3, 1, 0, 6, 6), False, 0.2),
])
def test_many_steps_reach_sklearn_solution(geometry, nonneg, mu):
    c, m, k, s, p, h, w = geometry
    lam = 0.2
    layer = make_layer(c, m, k, s, p, n_steps=2000, lam=lam, mu=mu, nonneg=nonneg)
    x = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        z = layer(x).numpy().ravel()
    expected = sklearn_solution(explicit_matrix(layer, (h, w)), x.numpy().ravel(), lam, mu, nonneg)
    assert (expected == 0).any() and (expected != 0).any()  # a genuinely sparse solution
    if not nonneg:
        assert (expected < 0).any()
    assert np.linalg.norm(z - expected) <= 1e-4 * np.linalg.norm(expected)


def test_zero_lambda_many_steps_is_least_squares():
    c, m, k, s, p, h, w = 3, 2, 3, 2, 1, 6, 6
    layer = make_layer(c, m, k, s, p, n_steps=2000, lam=0.0, nonneg=False)
    x = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        z = layer(x).numpy().ravel()
    a = explicit_matrix(layer, (h, w))
    singular = np.linalg.svd(a, compute_uv=False)
    assert singular[0] / singular[-1] < 10  # well conditioned: the least-squares solution is unique
    expected = np.linalg.lstsq(a, x.numpy().ravel(), rcond=None)[0]
    np.testing.assert_allclose(z, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("nonneg,mu", [(True, 0.0), (False, 0.1)])
def test_objective_bounds_fista_and_ista(nonneg, mu):
    """Beck & Teboulle 2009, Thm 3.1 / 4.4 with step η ≤ 1/L from z⁰ = 0:
    ISTA:  F(z^k) − F* ≤ ‖z*‖² / (2ηk) and F is non-increasing;
    FISTA: F(z^k) − F* ≤ 2‖z*‖² / (η(k + 1)²) (non-monotone: momentum ripples are allowed)."""
    c, m, k, s, p, h, w = 1, 3, 3, 1, 1, 7, 7
    lam = 0.1
    x = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    fista = make_layer(c, m, k, s, p, lam=lam, mu=mu, nonneg=nonneg)
    ista = make_layer(c, m, k, s, p, lam=lam, mu=mu, nonneg=nonneg, solver="ista")
    a, target = explicit_matrix(fista, (h, w)), x.numpy().ravel()
    z_star = sklearn_solution(a, target, lam, mu, nonneg)
    f_star = objective(a, target, z_star, lam, mu)
    with torch.no_grad():
        values = {"fista": [], "ista": []}
        for n in range(1, 41):
            for name, layer in (("fista", fista), ("ista", ista)):
                layer.n_steps = n
                values[name].append(objective(a, target, layer(x).numpy().ravel(), lam, mu))
    eta = STEP_SIZE_FACTOR / fista.lipschitz.item()
    assert eta * top_eig(a) < 1.0  # the step is stable for the true L
    r2 = float((z_star ** 2).sum())
    for n, (f_fista, f_ista) in enumerate(zip(values["fista"], values["ista"]), start=1):
        assert f_fista - f_star <= 2 * r2 / (eta * (n + 1) ** 2) + 1e-12
        assert f_ista - f_star <= r2 / (2 * eta * n) + 1e-12
    assert all(b <= a_ + 1e-12 for a_, b in zip(values["ista"], values["ista"][1:]))
    assert min(values["fista"]) >= f_star - 1e-9  # z* is the minimiser
    # momentum pays off: after 40 steps FISTA is much closer to the optimum than ISTA
    assert values["fista"][-1] - f_star < (values["ista"][-1] - f_star) / 3


# ----------------------------------------------------------------------------------------------
# Step size: power iteration
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_power_iteration_matches_explicit_spectral_norm(geometry):
    c, m, k, s, p, h, w = geometry
    layer = make_layer(c, m, k, s, p)  # default cold start: ≤ 50 steps, relative tolerance 1e-5
    with torch.no_grad():
        layer(torch.zeros(1, c, h, w, dtype=torch.float64))
    truth = top_eig(explicit_matrix(layer, (h, w)))
    # Power iteration approaches λ_max from below. The top eigenvalues of a convolution cluster
    # (λ₂/λ₁ ≈ 0.97-0.997 here), so 50 steps leave up to ~1 % ...
    assert truth * 0.98 <= layer.lipschitz.item() <= truth * (1 + 1e-12)
    assert layer.step_size.item() * truth < 1.0  # ... which the 0.9 margin of η absorbs
    # ... and every refresh continues from the stored vector: 200 × 5 warm steps converge
    for _ in range(200):
        layer.refresh()
    assert layer.lipschitz.item() == pytest.approx(truth, rel=2e-5)


def test_new_spatial_size_triggers_cold_start():
    layer = make_layer(3, 4, 4, 2, 1)
    with torch.no_grad():
        layer(torch.zeros(1, 3, 6, 6, dtype=torch.float64))
        small = layer.lipschitz.item()
        layer(torch.zeros(1, 3, 13, 11, dtype=torch.float64))
    truth = top_eig(explicit_matrix(layer, (13, 11)))
    assert layer.power_vector.shape == (1, 4, 6, 5)
    assert truth * 0.98 <= layer.lipschitz.item() <= truth * (1 + 1e-12)
    assert abs(small - truth) > 0.05 * truth  # the size matters, so a stale L would fail above


def converged_layer(c: int, m: int, k: int, s: int, p: int, size: int) -> CSCLayer:
    layer = make_layer(c, m, k, s, p)
    with torch.no_grad():
        layer(torch.zeros(1, c, size, size, dtype=torch.float64))
    for _ in range(100):
        layer.refresh()
    return layer


def test_warm_refresh_tracks_perturbed_dictionary():
    layer = converged_layer(3, 8, 4, 2, 1, 16)
    before = layer.lipschitz.item()
    with torch.no_grad():
        layer.weight.add_(0.2 * torch.randn(layer.weight.shape, generator=torch.Generator().manual_seed(6),
                                            dtype=torch.float64) / math.sqrt(48))
    layer.refresh()  # projection + 5 warm steps
    truth = top_eig(explicit_matrix(layer, (16, 16)))
    assert abs(before - truth) > 1e-2 * truth  # the perturbation moved L well beyond the tolerance below
    assert truth * (1 - 2e-3) <= layer.lipschitz.item() <= truth * (1 + 1e-12)


def test_power_iteration_is_deterministic_and_leaves_global_rng_alone():
    a, b = make_layer(3, 4, 4, 2, 1, seed=7), make_layer(3, 4, 4, 2, 1, seed=7)
    state = torch.get_rng_state()
    with torch.no_grad():
        a(torch.zeros(1, 3, 16, 16, dtype=torch.float64))
        b(torch.zeros(2, 3, 16, 16, dtype=torch.float64))
    assert torch.equal(torch.get_rng_state(), state)
    assert a.lipschitz.item() == b.lipschitz.item()


def test_step_size_is_fp32_under_bf16_autocast():
    torch.manual_seed(8)
    layer = CSCLayer(3, 8, 4, 2, 1)
    reference = CSCLayer(3, 8, 4, 2, 1)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = reference(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = layer(x)
    assert layer.lipschitz.dtype == torch.float32
    assert layer.lipschitz.item() == reference.lipschitz.item()  # power iteration ran with autocast off
    assert z.dtype == torch.bfloat16
    assert torch.allclose(z.float(), expected, atol=0.05, rtol=0.05)


# ----------------------------------------------------------------------------------------------
# Dictionary maintenance
# ----------------------------------------------------------------------------------------------


def atom_norms(weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(weight.detach(), dim=(1, 2, 3))


def test_init_and_refresh_give_unit_norm_atoms():
    layer = make_layer(3, 6, 4, 2, 1)
    assert torch.allclose(atom_norms(layer.weight), torch.ones(6, dtype=torch.float64))
    with torch.no_grad():
        layer.weight.mul_(torch.arange(1, 7, dtype=torch.float64).view(-1, 1, 1, 1))
    layer.refresh()  # before any forward: projection only, no input size to estimate L at
    assert torch.allclose(atom_norms(layer.weight), torch.ones(6, dtype=torch.float64))
    assert layer.lipschitz.item() == 1.0


def test_layer_used_twice_in_one_graph_backpropagates():
    layer = make_layer(3, 6, 4, 2, 1)
    x1, x2 = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 3, 8, 8, dtype=torch.float64)
    z1 = layer(x1)
    version = layer.weight._version
    z2 = layer(x2)  # an unchanged weight must not be touched in place between the two uses
    assert layer.weight._version == version
    ((z1 - z2) ** 2).sum().backward()
    grad = layer.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_forward_after_optimizer_step_refreshes_atoms_and_step_size():
    layer = converged_layer(3, 6, 4, 2, 1, 8)
    before = layer.lipschitz.item()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    opt = torch.optim.SGD(layer.parameters(), lr=2e-3)  # moves the atoms by ~5 %
    layer(x).pow(2).sum().backward()
    opt.step()
    assert not torch.allclose(atom_norms(layer.weight), torch.ones(6, dtype=torch.float64))
    with torch.no_grad():
        layer(x)
    assert torch.allclose(atom_norms(layer.weight), torch.ones(6, dtype=torch.float64))
    truth = top_eig(explicit_matrix(layer, (8, 8)))
    assert abs(before - truth) > 5e-3 * truth  # L moved well beyond the tolerance below
    assert truth * (1 - 2e-3) <= layer.lipschitz.item() <= truth * (1 + 1e-12)


def test_explicit_refresh_is_not_repeated_by_forward():
    layer = make_layer(3, 6, 4, 2, 1)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    layer(x).sum().backward()
    torch.optim.SGD(layer.parameters(), lr=1.0).step()
    refresh_dictionaries(layer)
    version, lipschitz = layer.weight._version, layer.lipschitz.clone()
    with torch.no_grad():
        layer(x)
    assert layer.weight._version == version
    assert torch.equal(layer.lipschitz, lipschitz)


def test_state_dict_round_trip_reproduces_codes():
    layer = make_layer(3, 6, 4, 2, 1)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        z = layer(x)
    state = layer.state_dict()
    assert set(state) == {"weight", "lipschitz"}  # the warm-start vector depends on the size: not saved
    other = make_layer(3, 6, 4, 2, 1, seed=3)
    other.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(other(x), z, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def test_input_validation_messages():
    layer = CSCLayer(3, 4, 4, 2, 1)
    with pytest.raises(ValueError, match=r"expects x of shape \(b, 3, H, W\), got \(2, 1, 8, 8\)"):
        layer(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"got \(3, 8, 8\)"):
        layer(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="too small for kernel 4"):
        CSCLayer(3, 4, 4, 1, 0)(torch.zeros(1, 3, 3, 5))
    for kwargs, match in (({"solver": "adam"}, "solver"), ({"lam": -0.1}, "lam"), ({"n_steps": 0}, "n_steps"),
                          ({"power_iters_warm": 0}, "power_iters_warm")):
        with pytest.raises(ValueError, match=match):
            CSCLayer(3, 4, 4, **kwargs)


def test_check_finite():
    check_finite(torch.zeros(3))
    with pytest.raises(ValueError, match="2 of its 3 values are NaN or inf"):
        check_finite(torch.tensor([0.0, float("nan"), float("inf")]))


# ----------------------------------------------------------------------------------------------
# Synthesis layer
# ----------------------------------------------------------------------------------------------


def test_synthesis_layer_own_dictionary():
    torch.manual_seed(9)
    layer = SynthesisLayer(6, 3, 4, 2, 1)
    assert torch.allclose(atom_norms(layer.weight), torch.ones(6))
    z = torch.randn(2, 6, 4, 4)
    assert layer(z, 8).shape == (2, 3, 8, 8)
    assert layer(z, (9, 8)).shape == (2, 3, 9, 8)
    opt = torch.optim.SGD(layer.parameters(), lr=10.0)
    layer(z, 8).pow(2).sum().backward()
    opt.step()
    version = layer.weight._version
    out = layer(z, 8)
    assert layer.weight._version != version  # the changed atoms were projected ...
    assert torch.allclose(atom_norms(layer.weight), torch.ones(6))
    version = layer.weight._version
    layer(z, 8)
    assert layer.weight._version == version  # ... and unchanged atoms are left alone
    assert out.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"expects z of shape \(b, 6, h, w\)"):
        layer(torch.zeros(2, 5, 4, 4), 8)


def test_tied_synthesis_uses_the_encoder_dictionary():
    csc = make_layer(3, 6, 4, 2, 1)
    tied = SynthesisLayer(6, 3, 4, 2, 1, tied_to=csc)
    assert list(tied.parameters()) == [] and tied.state_dict() == {}
    assert tied.dictionary is csc.weight
    z = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    assert torch.equal(tied(z, 8), csc.synthesize(z, 8))
    with torch.no_grad():
        csc.weight.mul_(3.0)  # the owner's atoms changed: the tied layer refreshes them before use
    tied(z, 8)
    assert torch.allclose(atom_norms(csc.weight), torch.ones(6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"needs its dictionary of shape \(6, 4, 4, 4\)"):
        SynthesisLayer(6, 4, 4, 2, 1, tied_to=csc)
    with pytest.raises(ValueError, match="stride 1"):
        SynthesisLayer(6, 3, 4, 1, 1, tied_to=csc)


def test_refresh_dictionaries_finds_every_layer():
    csc = make_layer(3, 6, 4, 2, 1)
    container = torch.nn.ModuleDict({"a": csc, "b": torch.nn.Sequential(SynthesisLayer(6, 3, 4, 2, 1).double())})
    with torch.no_grad():
        for p in container.parameters():
            p.mul_(2.0)
    assert refresh_dictionaries(container) == 2
    for p in container.parameters():
        assert torch.allclose(atom_norms(p), torch.ones(6, dtype=torch.float64))
