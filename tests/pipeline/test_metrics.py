"""pipeline/metrics.py against closed forms and independent implementations (numpy float64,
scipy.linalg.sqrtm, scikit-image's SSIM, scikit-learn's k-NN) on real photos and synthetic features."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from skimage import data as skdata
from skimage.metrics import structural_similarity
from sklearn.neighbors import KNeighborsClassifier

from pipeline import metrics


def photo(name: str, size: int = 160) -> torch.Tensor:
    """A centre crop of a bundled scikit-image photo as a (1, c, size, size) tensor in [-1, 1]."""
    img = getattr(skdata, name)()
    if img.ndim == 2:
        img = img[..., None]
    h, w = img.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    crop = img[top:top + size, left:left + size, :3].astype(np.float64) / 127.5 - 1.0
    return torch.from_numpy(crop).permute(2, 0, 1)[None].float()


# ---------------------------------------------------------------------------------------------- MSE / PSNR


def test_mse_matches_numpy_per_image():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1, torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    expected = ((x.double() - y.double()) ** 2).numpy().reshape(3, -1).mean(1)
    np.testing.assert_allclose(metrics.mse(x, y, reduction="none").numpy(), expected, rtol=1e-6)
    assert metrics.mse(x, y).item() == pytest.approx(expected.mean(), rel=1e-6)


def test_psnr_identical_images_is_infinite():
    x = photo("astronaut")
    assert math.isinf(metrics.psnr(x, x).item()) and metrics.psnr(x, x).item() > 0


@pytest.mark.parametrize("offset", [0.01, 0.1, 0.5])
def test_psnr_constant_offset_closed_form(offset):
    # x + δ has MSE δ², so PSNR = 10 log10(L² / δ²) with L = 2.
    x = photo("chelsea") * 0.5
    expected = 10 * math.log10(4.0 / offset**2)
    assert metrics.psnr(x + offset, x).item() == pytest.approx(expected, abs=1e-3)


def test_psnr_per_image_and_mean():
    x = torch.zeros(2, 1, 4, 4)
    y = torch.cat([torch.full((1, 1, 4, 4), 0.1), torch.full((1, 1, 4, 4), 0.2)])
    per_image = metrics.psnr(x, y, reduction="none")
    expected = [10 * math.log10(4 / 0.01), 10 * math.log10(4 / 0.04)]
    np.testing.assert_allclose(per_image.numpy(), expected, rtol=1e-5)
    assert metrics.psnr(x, y).item() == pytest.approx(sum(expected) / 2, rel=1e-5)
    # data_range enters squared: L = 1 lowers every PSNR by 10 log10(4) dB.
    assert metrics.psnr(x, y, data_range=1.0).item() == pytest.approx(sum(expected) / 2 - 10 * math.log10(4),
                                                                      rel=1e-5)


# ---------------------------------------------------------------------------------------------- SSIM


def test_gaussian_window_is_normalised_and_symmetric():
    w = metrics.gaussian_window().double()
    assert w.shape == (11,) and w.sum().item() == pytest.approx(1.0)
    assert torch.allclose(w, w.flip(0)) and w.argmax().item() == 5
    assert (w[6] / w[5]).item() == pytest.approx(math.exp(-1 / (2 * 1.5**2)))


def test_ssim_of_image_with_itself_is_one():
    x = torch.cat([photo("astronaut"), photo("coffee")])
    np.testing.assert_allclose(metrics.ssim(x, x, 2.0, reduction="none").numpy(), [1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(metrics.ssim_signed_unit(x, x, reduction="none").numpy(), [1.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("a,b", [(0.5, 0.5), (0.2, -0.3), (-1.0, 1.0)])
def test_ssim_of_constant_images_closed_form(a, b):
    # Constant images: μx = a, μy = b, σ = 0, so SSIM = (2ab + C1) / (a² + b² + C1), C1 = (0.01 · 2)².
    # float64 inputs are computed in float64; float32 ones carry the round-off of σ² = E[x²] − μ².
    c1 = (0.01 * 2) ** 2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
        x, y = torch.full((1, 3, 16, 16), a, dtype=dtype), torch.full((1, 3, 16, 16), b, dtype=dtype)
        assert metrics.ssim(x, y, data_range=2.0).item() == pytest.approx(expected, abs=tol)


def distortions(x: torch.Tensor) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    blurred = torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
    return [
        (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1),  # additive noise
        blurred,
        x * 0.7 + 0.2,  # contrast and brightness change
        torch.roll(x, shifts=(3, -2), dims=(2, 3)),  # misalignment
    ]


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "camera"])
def test_ssim_matches_scikit_image_on_real_photos(name):
    x = photo(name)
    for y in distortions(x):
        expected = structural_similarity(
            x[0].permute(1, 2, 0).double().numpy(), y[0].permute(1, 2, 0).double().numpy(),
            channel_axis=-1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=2.0)
        assert metrics.ssim(x, y, data_range=2.0).item() == pytest.approx(expected, abs=1e-4)


def standard_ssim(x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """scikit-image's SSIM of each image pair mapped from [-1, 1] to [0, 1], data range 1 (the standard
    SSIM: Gaussian window σ = 1.5, population covariance), computed independently in float64."""
    to_unit = lambda t: ((t.double() + 1.0) / 2.0).numpy()  # noqa: E731
    return [structural_similarity(to_unit(a), to_unit(b), data_range=1.0, gaussian_weights=True, sigma=1.5,
                                  use_sample_covariance=False, channel_axis=0) for a, b in zip(x, y)]


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee", "camera"])
def test_ssim_signed_unit_is_scikit_images_ssim_of_the_images_in_0_1(name):
    x = photo(name)  # camera is grey: (1, 1, 160, 160)
    ys = distortions(x)
    xs = x.expand(len(ys), -1, -1, -1)
    y = torch.cat(ys)
    np.testing.assert_allclose(metrics.ssim_signed_unit(xs, y, reduction="none").numpy(), standard_ssim(xs, y),
                               atol=1e-4)


def test_standard_ssim_differs_from_the_minus_one_to_one_number_when_luminance_differs():
    # A darker copy of a real photo: the same structure, means lower by 0.3 (a quarter of the range).
    x = photo("astronaut")
    y = (x - 0.3).clamp(-1, 1)
    standard = metrics.ssim_signed_unit(x, y).item()
    assert standard == pytest.approx(standard_ssim(x, y)[0], abs=1e-4)
    old = metrics.ssim(x, y, data_range=2.0).item()  # SSIM of the [-1, 1] values with L = 2: not standard
    assert abs(standard - old) > 0.05, (standard, old)
    # Constant images, closed form: only the luminance factor is left. Mid-grey (0) against 0.1:
    # standard (2 u v + K1²) / (u² + v² + K1²) with u = 0.5, v = 0.55, against the [-1, 1] value
    # C1 / (0.01 + C1), C1 = (2 K1)².
    a, b = torch.zeros(1, 1, 16, 16, dtype=torch.float64), torch.full((1, 1, 16, 16), 0.1, dtype=torch.float64)
    u, v, k1 = 0.5, 0.55, 0.01
    standard = (2 * u * v + k1**2) / (u * u + v * v + k1**2)
    assert metrics.ssim_signed_unit(a, b).item() == pytest.approx(standard, abs=1e-12)
    assert metrics.ssim(a, b, data_range=2.0).item() == pytest.approx(0.02**2 / (0.01 + 0.02**2), abs=1e-12)


def test_ssim_per_image_matches_single_calls():
    x = torch.cat([photo("astronaut"), photo("coffee")])
    y = torch.cat([distortions(x[:1])[0], distortions(x[1:])[1]])
    per_image = metrics.ssim_signed_unit(x, y, reduction="none")
    assert per_image.shape == (2,)
    assert per_image[0].item() == pytest.approx(metrics.ssim_signed_unit(x[:1], y[:1]).item(), abs=1e-6)
    assert per_image[1].item() == pytest.approx(metrics.ssim_signed_unit(x[1:], y[1:]).item(), abs=1e-6)


def test_reconstruction_metrics_reject_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        metrics.psnr(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 15))
    with pytest.raises(ValueError, match="at least 11"):
        metrics.ssim_signed_unit(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="data_range=0"):
        metrics.ssim(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16), data_range=0)
    with pytest.raises(ValueError, match="reduction"):
        metrics.mse(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), reduction="sum")


# ---------------------------------------------------------------------------------------------- Fréchet distance


def fd_closed_form(mu1, s1, mu2, s2) -> float:
    """The textbook formula with scipy.linalg.sqrtm (an independent matrix square root)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def random_spd(rng, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).standard_normal((500, 16))
    assert abs(metrics.frechet_distance(feats, feats)) < 1e-8


def test_frechet_distance_grows_with_added_noise():
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((2000, 8)) @ rng.standard_normal((8, 8))
    noise = rng.standard_normal(feats.shape)
    distances = [metrics.frechet_distance(feats, feats + s * noise) for s in (0.0, 0.1, 0.3, 1.0, 3.0)]
    assert distances[0] == pytest.approx(0.0, abs=1e-8)
    assert all(a < b for a, b in itertools.pairwise(distances)), distances


def test_frechet_distance_from_stats_matches_scipy_sqrtm():
    rng = np.random.default_rng(2)
    for d in (1, 3, 10):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = random_spd(rng, d), random_spd(rng, d)
        ours = metrics.frechet_distance_from_stats(metrics.GaussianStats(mu1, s1, 0),
                                                   metrics.GaussianStats(mu2, s2, 0))
        assert ours == pytest.approx(fd_closed_form(mu1, s1, mu2, s2), rel=1e-9, abs=1e-10)


def test_frechet_distance_of_diagonal_gaussians_closed_form():
    # Commuting covariances: FD = ‖μ1 − μ2‖² + Σᵢ (√aᵢ − √bᵢ)².
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    exact = metrics.frechet_distance_from_stats(metrics.GaussianStats(mu1, np.diag(a), 0),
                                                metrics.GaussianStats(mu2, np.diag(b), 0))
    assert exact == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_samples_matches_the_gaussians_closed_form():
    rng = np.random.default_rng(3)
    d = 4
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    x1 = rng.multivariate_normal(mu1, s1, size=200_000)
    x2 = rng.multivariate_normal(mu2, s2, size=200_000)
    expected = fd_closed_form(mu1, s1, mu2, s2)
    assert metrics.frechet_distance(x1, x2) == pytest.approx(expected, rel=0.02)
    assert metrics.frechet_distance(torch.from_numpy(x1).float(), x2) == pytest.approx(expected, rel=0.02)


def test_frechet_distance_with_fewer_samples_than_dimensions_is_finite():
    rng = np.random.default_rng(4)
    fd = metrics.frechet_distance(rng.standard_normal((20, 64)), rng.standard_normal((30, 64)) + 1.0)
    assert math.isfinite(fd) and fd > 64 * 0.5  # the mean shift alone contributes 64


def test_frechet_distance_rejects_bad_inputs():
    with pytest.raises(ValueError, match="dimensions differ"):
        metrics.frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="NaN"):
        metrics.frechet_distance(np.full((5, 3), np.nan), np.zeros((5, 3)))


# ---------------------------------------------------------------------------------------------- KID


def mmd2_loops(a: np.ndarray, b: np.ndarray) -> float:
    """The unbiased MMD² estimator written as explicit sums over pairs."""
    d, m = a.shape[1], a.shape[0]
    k = lambda u, v: (float(u @ v) / d + 1.0) ** 3  # noqa: E731
    same = sum(k(a[i], a[j]) + k(b[i], b[j]) for i in range(m) for j in range(m) if i != j)
    cross = sum(k(a[i], b[j]) for i in range(m) for j in range(m))
    return same / (m * (m - 1)) - 2 * cross / m**2


def test_mmd2_matches_explicit_pair_sums():
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((12, 5)), rng.standard_normal((12, 5)) + 0.3
    assert metrics.mmd2_unbiased(a, b) == pytest.approx(mmd2_loops(a, b), rel=1e-10)


def test_kid_with_one_full_subset_is_the_mmd_of_the_sets():
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((30, 4)), rng.standard_normal((30, 4)) * 1.5
    result = metrics.kid(a, b, subsets=1, subset_size=30)
    assert result.mean == pytest.approx(mmd2_loops(a, b), rel=1e-10) and result.std == 0.0


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((1000, 16)), rng.standard_normal((1000, 16))
    same = metrics.kid(a, b, subsets=20, subset_size=200)
    shifted = metrics.kid(a, b + 0.5, subsets=20, subset_size=200)
    assert abs(same.mean) < 3 * same.std / math.sqrt(20) + 1e-3
    assert shifted.mean > 20 * max(abs(same.mean), same.std)
    # The same seed draws the same subsets.
    assert metrics.kid(a, b + 0.5, subsets=20, subset_size=200) == shifted


def test_kid_rejects_subsets_larger_than_the_sets():
    with pytest.raises(ValueError, match="subset_size=50"):
        metrics.kid(np.zeros((40, 3)), np.zeros((60, 3)), subset_size=50)


# ---------------------------------------------------------------------------------------------- classification


def sphere(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rng, n_per_class: int, centres: np.ndarray, spread: float):
    labels = np.repeat(np.arange(len(centres)), n_per_class)
    feats = sphere(centres[labels] + spread * rng.standard_normal((len(labels), centres.shape[1])))
    return feats.astype(np.float32), labels


def test_knn_on_separable_features_is_perfect():
    rng = np.random.default_rng(8)
    centres = sphere(rng.standard_normal((5, 32))) * 3
    train, y_train = clustered(rng, 40, centres, 0.2)
    test, y_test = clustered(rng, 20, centres, 0.2)
    assert metrics.knn_accuracy(train, y_train, test, y_test, k=7) == 1.0
    # Labels need not be 0..k-1: predictions come back in the caller's label values.
    codes = np.array([3, 11, 42, 7, 100])
    assert metrics.knn_accuracy(train, codes[y_train], test, codes[y_test], k=7) == 1.0


def test_knn_on_random_labels_is_near_chance():
    rng = np.random.default_rng(9)
    train, test = sphere(rng.standard_normal((3000, 16))), sphere(rng.standard_normal((3000, 16)))
    acc = metrics.knn_accuracy(train, rng.integers(0, 10, 3000), test, rng.integers(0, 10, 3000), k=15)
    assert abs(acc - 0.1) < 0.03


def test_knn_matches_scikit_learn_cosine_knn():
    rng = np.random.default_rng(10)
    centres = rng.standard_normal((2, 8))
    train, y_train = clustered(rng, 200, centres, 1.5)
    test, _ = clustered(rng, 100, centres, 1.5)
    for k in (1, 5, 9):  # odd k and two classes: no vote ties, so the tie rule does not matter
        ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute").fit(train, y_train)
        np.testing.assert_array_equal(metrics.knn_predict(train, y_train, test, k=k).numpy(), ref.predict(test))


def test_knn_tie_goes_to_the_nearest_neighbours_class():
    train = np.array([[1.0, 0.1], [1.0, -0.3], [0.0, 1.0]])
    labels = np.array([5, 2, 2])
    test = np.array([[1.0, 0.0]])
    # k = 2: one vote each for 5 (nearest) and 2 (second), so 5 wins; k = 3: 2 has two votes.
    assert metrics.knn_predict(train, labels, test, k=2).tolist() == [5]
    assert metrics.knn_predict(train, labels, test, k=3).tolist() == [2]


def test_knn_rejects_bad_inputs():
    with pytest.raises(ValueError, match="exceeds"):
        metrics.knn_accuracy(np.zeros((3, 2)), [0, 1, 0], np.zeros((2, 2)), [0, 1], k=4)
    with pytest.raises(ValueError, match="integer labels"):
        metrics.knn_accuracy(np.zeros((3, 2)), [0.0, 1.0, 0.0], np.zeros((2, 2)), [0, 1], k=1)
    with pytest.raises(ValueError, match="dimensions differ"):
        metrics.knn_accuracy(np.zeros((3, 2)), [0, 1, 0], np.zeros((2, 3)), [0, 1], k=1)


def subspace_samples(rng, bases: np.ndarray, n_per_class: int):
    labels = np.repeat(np.arange(len(bases)), n_per_class)
    coeffs = rng.standard_normal((len(labels), bases.shape[2]))
    feats = sphere(np.einsum("ndr,nr->nd", bases[labels], coeffs))
    return feats, labels


def test_nearest_subspace_on_distinct_random_subspaces_is_perfect():
    rng = np.random.default_rng(11)
    bases = np.stack([np.linalg.qr(rng.standard_normal((64, 4)))[0] for _ in range(6)])
    train, y_train = subspace_samples(rng, bases, 50)
    test, y_test = subspace_samples(rng, bases, 30)
    assert metrics.nearest_subspace_accuracy(train, y_train, test, y_test, n_components=4) == 1.0


def test_nearest_subspace_matches_explicit_residuals():
    rng = np.random.default_rng(12)
    train, test = rng.standard_normal((90, 10)) + 0.5, rng.standard_normal((40, 10)) + 0.5
    y_train = rng.integers(0, 3, 90)
    r = 3
    residuals = []
    for j in range(3):
        u = np.linalg.svd(train[y_train == j].T, full_matrices=False)[0][:, :r]  # uncentered basis, (d, r)
        residuals.append(np.linalg.norm(test.T - u @ (u.T @ test.T), axis=0))
    expected = np.argmin(np.stack(residuals), axis=0)
    got = metrics.nearest_subspace_predict(train, y_train, test, n_components=r).numpy()
    np.testing.assert_array_equal(got, expected)


def test_nearest_subspace_is_uncentered():
    # Two short parallel segments, (1, t) and (−1, 3 + t): centred PCA gives both the direction (0, 1);
    # the uncentered top direction of each is the one through the origin, ≈ (1, 0) and ≈ (−1, 3)/√10.
    t = np.linspace(-0.2, 0.2, 11)
    a = np.stack([np.ones_like(t), t], 1)
    b = np.stack([-np.ones_like(t), 3.0 + t], 1)
    train = np.concatenate([a, b])
    labels = np.repeat([0, 1], len(t))
    _classes, bases = metrics.class_subspaces(train, labels, n_components=1)
    assert abs(float(bases[0, 0, 0])) > 0.99  # class 0's direction ≈ (1, 0), not (0, 1)
    assert metrics.nearest_subspace_accuracy(train, labels, train, labels, n_components=1) == 1.0


def test_nearest_subspace_small_class_keeps_its_directions():
    rng = np.random.default_rng(13)
    train = rng.standard_normal((7, 5))
    labels = np.array([0, 0, 0, 0, 0, 1, 1])  # class 1 has 2 samples < n_components = 3
    _classes, bases = metrics.class_subspaces(train, labels, n_components=3)
    assert bases.shape == (2, 5, 3)
    gram = bases[1].T @ bases[1]
    np.testing.assert_allclose(gram.numpy(), np.diag([1.0, 1.0, 0.0]), atol=1e-5)
    with pytest.raises(ValueError, match="n_components=6"):
        metrics.class_subspaces(train, labels, n_components=6)


# ---------------------------------------------------------------------------------------------- sparsity


def test_sparsity_and_atom_usage_count_non_zeros():
    code = torch.zeros(2, 4, 3, 3)
    code[:, 0] = 1.0  # atom 0: dense
    code[0, 1, 0, 0] = -0.5  # atom 1: 1 of 18 entries
    code[1, 2, :, 1] = 2.0  # atom 2: 3 of 18 entries
    s = metrics.sparsity(code)
    assert isinstance(s, torch.Tensor) and s.dim() == 0
    assert s.item() == pytest.approx((18 + 1 + 3) / 72)
    np.testing.assert_allclose(metrics.atom_usage(code).numpy(), [1.0, 1 / 18, 3 / 18, 0.0], rtol=1e-6)
    assert metrics.sparsity(code, threshold=1.0).item() == pytest.approx(3 / 72)
    with pytest.raises(ValueError, match="num_atoms"):
        metrics.atom_usage(torch.zeros(4, 3))


def test_item_match_counts_reconstructions_nearest_to_their_own_input():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(50, 1, 8, 8, generator=g) * 2 - 1
    assert float(metrics.item_match(x, x)) == 1.0
    assert float(metrics.item_match(x, x + 0.01 * torch.randn(x.shape, generator=g))) == 1.0
    assert float(metrics.item_match(x, x.roll(1, dims=0))) == 0.0  # each is another image exactly
    # every reconstruction the mean image ("the class"): only the image nearest to the mean matches
    mean = x.mean(0, keepdim=True).expand_as(x)
    assert float(metrics.item_match(x, mean)) == pytest.approx(1 / 50)
    with pytest.raises(ValueError):
        metrics.item_match(x, x[:10])
