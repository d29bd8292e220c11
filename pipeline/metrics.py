"""Evaluation metrics: reconstruction quality, distribution distances, feature classification, sparsity.

Images are float tensors in [-1, 1], shape (b, c, h, w), so the dynamic range L of PSNR is 2 (the same
PSNR as [0, 1] images with L = 1). SSIM is not invariant to that offset: the reported one is the standard
SSIM, of the images mapped to [0, 1] with L = 1 (`ssim_signed_unit`); `ssim` is the formula for any range.
Feature sets are (n, d) arrays or tensors, one row per sample (the rows of ``z``; docs/method.md §4 writes
the transposed Z ∈ ℝ^{d×n}).

    reconstruction   mse, psnr, ssim, ssim_signed_unit        per image, or their mean over the batch
                     item_match                               reconstructions nearest to their own input
    distributions    frechet_distance (Gaussian 2-Wasserstein), kid (unbiased polynomial-kernel MMD²)
    classification   knn_accuracy (cosine k-NN, majority vote), nearest_subspace_accuracy (MCR²/CTRL)
    sparse codes     sparsity (fraction of non-zero entries), atom_usage (the same per atom)

References: Wang et al. 2004 (SSIM); Heusel et al. 2017 (Fréchet distance of features);
Bińkowski et al. 2018 (KID); Yu et al. 2020 (MCR², nearest subspace); Dai et al. 2022 (CTRL).
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Reduction = Literal["mean", "none"]

SSIM_WINDOW = 11  # pixels: Gaussian window side (Wang et al. 2004)
SSIM_SIGMA = 1.5  # pixels: Gaussian window standard deviation
SSIM_K1 = 0.01
SSIM_K2 = 0.03
KNN_CHUNK = 1024  # test rows per similarity block: bounds memory at KNN_CHUNK × n_train floats


# ----------------------------------------------------------------------------------------------
# Reconstruction quality
# ----------------------------------------------------------------------------------------------


def _check_pair(x: Tensor, y: Tensor, name: str) -> None:
    if x.dim() != 4 or x.shape != y.shape:
        raise ValueError(f"{name}: expected two image batches of the same shape (b, c, h, w), "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (fp16, bf16, fp32) is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _reduce(per_image: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "mean":
        return per_image.mean()
    if reduction == "none":
        return per_image
    raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'none'")


def mse(x: Tensor, y: Tensor, reduction: Reduction = "mean") -> Tensor:
    """MSE(x, y) = (1 / chw) Σ (x − y)² per image.

    x, y: (b, c, h, w). Returns (b,) with reduction="none", else the mean over the batch (a 0-d
    tensor on x's device: no host synchronisation).
    """
    _check_pair(x, y, "mse")
    dtype = _compute_dtype(x)
    diff = x.to(dtype) - y.to(dtype)
    return _reduce(diff.square().flatten(1).mean(1), reduction)


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0, reduction: Reduction = "mean") -> Tensor:
    """PSNR(x, y) = 10 · log10(L² / MSE(x, y)) in dB, per image; L = data_range (2 for [-1, 1]).

    Identical images give +inf. The "mean" reduction averages the per-image PSNRs (the usual
    convention of reconstruction papers), which is not the PSNR of the mean MSE.
    """
    if data_range <= 0:
        raise ValueError(f"psnr: data_range={data_range} must be > 0 (2.0 for images in [-1, 1])")
    per_image_mse = mse(x, y, reduction="none")
    return _reduce(10.0 * torch.log10(data_range**2 / per_image_mse), reduction)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, dtype=torch.float32) -> Tensor:
    """1-D Gaussian weights w_i ∝ exp(−i² / 2σ²), i = −(size−1)/2 … (size−1)/2, summing to 1."""
    i = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(i**2) / (2 * sigma**2))
    return (w / w.sum()).to(dtype)


def ssim(x: Tensor, y: Tensor, data_range: float, reduction: Reduction = "mean") -> Tensor:
    """Structural similarity (Wang et al. 2004), per image: the mean over channels and pixels of

        SSIM(p) = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2)),
        C1 = (K1 L)², C2 = (K2 L)², K1 = 0.01, K2 = 0.03, L = data_range,

    where μ, σ², σxy are local moments under an 11×11 Gaussian window (σ = 1.5), computed per channel
    at every position where the window fits inside the image ("valid"; the original paper's code
    and scikit-image's cropped mean use the same positions). Moments use the window weights directly
    (population covariance, no n/(n−1) factor).

    x, y: (b, c, h, w) with h, w >= 11. Returns (b,) with reduction="none", else the batch mean.
    L has no default: the luminance factor depends on where the range starts, not only on its width
    (see ssim_signed_unit for images in [-1, 1]).
    """
    _check_pair(x, y, "ssim")
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"ssim: images must be at least {SSIM_WINDOW}×{SSIM_WINDOW} pixels for the "
                         f"Gaussian window, got {tuple(x.shape[-2:])}")
    if data_range <= 0:
        raise ValueError(f"ssim: data_range={data_range} must be > 0 (1.0 for images in [0, 1], 255.0 for "
                         "0…255; images in [-1, 1] go through ssim_signed_unit)")
    b, c, h, w = x.shape
    dtype = _compute_dtype(x)
    # Channels become batch entries so one separable depthwise filter handles every channel.
    x = x.to(dtype).reshape(b * c, 1, h, w)
    y = y.to(dtype).reshape(b * c, 1, h, w)
    g = gaussian_window(dtype=dtype).to(x.device)
    g_rows, g_cols = g.view(1, 1, -1, 1), g.view(1, 1, 1, -1)

    def blur(t: Tensor) -> Tensor:  # E_w[t]: separable Gaussian filter, valid positions only
        return F.conv2d(F.conv2d(t, g_rows), g_cols)

    # All five moments in one filter pass: (5·bc, 1, h, w) → (5·bc, 1, h−10, w−10).
    moments = blur(torch.cat([x, y, x * x, y * y, x * y]))
    mu_x, mu_y, e_xx, e_yy, e_xy = moments.chunk(5)
    var_x = e_xx - mu_x**2  # σx² = E[x²] − μx²
    var_y = e_yy - mu_y**2
    cov_xy = e_xy - mu_x * mu_y  # σxy = E[xy] − μx μy
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    per_image = ssim_map.reshape(b, -1).mean(1)  # mean over channels and positions
    return _reduce(per_image, reduction)


def ssim_signed_unit(x: Tensor, y: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Standard SSIM of images in [-1, 1]: ssim((x + 1) / 2, (y + 1) / 2, data_range=1), per image.

    Standard SSIM is that of images in [0, 1] with L = 1 (or of 0…255 with L = 255: the same number),
    not of [-1, 1] images with L = 2. Under u = (x + 1) / 2 the contrast-structure factor
    (2 σxy + C2) / (σx² + σy² + C2) is unchanged (every term scales by ¼), but the luminance factor
    is not: in [-1, 1] coordinates the standard one is

        (2 (μx + 1)(μy + 1) + C1) / ((μx + 1)² + (μy + 1)² + C1),   C1 = (2 K1)²,

    where ssim(x, y, data_range=2) would use (2 μx μy + C1) / (μx² + μy² + C1): the standard factor
    with every mean shifted by −1 (mid-grey moved to 0). E.g. μx = 0, μy = 0.1 gives 0.9955 in the
    standard factor and C1 / (0.01 + C1) = 0.038 in the shifted one. x, y: (b, c, h, w) with h, w >= 11,
    computed in float32 (float64 stays float64). Returns (b,) with reduction="none", else the batch mean.
    """
    dtype = _compute_dtype(x)
    return ssim((x.to(dtype) + 1.0) / 2.0, (y.to(dtype) + 1.0) / 2.0, data_range=1.0, reduction=reduction)


def item_match(x: Tensor, x_hat: Tensor) -> Tensor:
    """Share of reconstructions that are of their own input and not of another image:

        item_match = (1/n) Σᵢ [ argmin_j ‖x̂ᵢ − x_j‖₂ = i ]

    over the n images given (x, x̂: (n, …)). 1/n is chance; reconstructions of the right class but not of
    the item score near 0, a perfect autoencoder 1. Ties go to the lowest index. Distances in ≥ fp32."""
    _check_pair(x, x_hat, "item_match")
    dtype = _compute_dtype(x)
    a, b = x_hat.to(dtype).flatten(1), x.to(dtype).flatten(1)
    nearest = torch.cdist(a, b).argmin(dim=1)
    return (nearest == torch.arange(len(a), device=a.device)).to(dtype).mean()


# ----------------------------------------------------------------------------------------------
# Distances between feature distributions
# ----------------------------------------------------------------------------------------------


def _as_float64(feats, name: str) -> np.ndarray:
    if isinstance(feats, Tensor):
        feats = feats.detach().cpu().numpy()
    arr = np.asarray(feats, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a (n, d) feature matrix, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return arr


class GaussianStats(NamedTuple):
    """Mean μ (d,) and covariance Σ (d, d) of a feature set, float64; cacheable for a reference set."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int


def gaussian_stats(feats) -> GaussianStats:
    """μ = (1/n) Σ fᵢ and Σ = (1/(n−1)) Σ (fᵢ − μ)(fᵢ − μ)ᵀ of features (n, d), in float64."""
    arr = _as_float64(feats, "gaussian_stats")
    if arr.shape[0] < 2:
        raise ValueError(f"gaussian_stats: need at least 2 samples for a covariance, got {arr.shape[0]}")
    return GaussianStats(arr.mean(0), np.cov(arr, rowvar=False, ddof=1).reshape(arr.shape[1], -1),
                         arr.shape[0])


def _psd_sqrt(mat: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root via eigh, negative round-off eigenvalues clipped to 0."""
    evals, evecs = np.linalg.eigh((mat + mat.T) / 2)
    return (evecs * np.sqrt(np.clip(evals, 0.0, None))) @ evecs.T


def frechet_distance_from_stats(a: GaussianStats, b: GaussianStats) -> float:
    """FD = ‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½)   (2-Wasserstein² between two Gaussians).

    Tr((Σa Σb)^½) is computed as Σᵢ √λᵢ(Σa^½ Σb Σa^½): that matrix is similar to Σa Σb
    (Σa^½ (Σa^½ Σb) vs (Σa^½ Σb) Σa^½) and symmetric PSD, so its eigenvalues are real and ≥ 0 and no
    complex sqrtm output has to be discarded, even for the rank-deficient covariances of n < d samples.
    """
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"frechet_distance: feature dimensions differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    sqrt_a = _psd_sqrt(a.sigma)
    middle = sqrt_a @ b.sigma @ sqrt_a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = a.mu - b.mu
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * tr_covmean)


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (n_a, d) and (n_b, d), float64.

    FD = ‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½). On Inception-v3 pool features this is FID; on other
    networks report it under that network's name (e.g. fd_effnetlite0), never as FID.
    """
    return frechet_distance_from_stats(gaussian_stats(feats_a), gaussian_stats(feats_b))


class KID(NamedTuple):
    """Kernel distance: mean and standard deviation of the unbiased MMD² over random subsets."""

    mean: float
    std: float


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """k(x, y) = (xᵀy / d + 1)³ for all row pairs: (n, d), (m, d) → (n, m)."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd2_unbiased(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD² of two equal-size samples (m, d) with the cubic polynomial kernel:

        MMD²ᵤ = 1/(m(m−1)) Σ_{i≠j} k(aᵢ, aⱼ) + 1/(m(m−1)) Σ_{i≠j} k(bᵢ, bⱼ) − 2/m² Σ_{i,j} k(aᵢ, bⱼ)
    """
    m = a.shape[0]
    k_aa, k_bb, k_ab = polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b)
    off_diag = (k_aa.sum() - np.trace(k_aa) + k_bb.sum() - np.trace(k_bb)) / (m * (m - 1))
    return float(off_diag - 2.0 * k_ab.sum() / m**2)


def kid(feats_a, feats_b, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> KID:
    """Kernel distance (KID when the features are Inception's; generic over features).

    For each of `subsets` rounds, draw `subset_size` rows from each set without replacement
    (independently per round, numpy Generator seeded by `seed`) and compute the unbiased MMD²
    (`mmd2_unbiased`, kernel k(x, y) = (xᵀy/d + 1)³). Returns the mean and the standard deviation
    over rounds. Unbiased: the expected value is 0 when both sets come from one distribution, so
    single rounds may be slightly negative.
    """
    a = _as_float64(feats_a, "kid")
    b = _as_float64(feats_b, "kid")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"kid: feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if subsets < 1:
        raise ValueError(f"kid: subsets={subsets} must be >= 1")
    if not 2 <= subset_size <= min(len(a), len(b)):
        raise ValueError(f"kid: subset_size={subset_size} must be in [2, min(n_a, n_b)] = "
                         f"[2, min({len(a)}, {len(b)})]")
    rng = np.random.default_rng(seed)
    values = np.array([
        mmd2_unbiased(a[rng.choice(len(a), subset_size, replace=False)],
                      b[rng.choice(len(b), subset_size, replace=False)])
        for _ in range(subsets)])
    return KID(float(values.mean()), float(values.std()))


# ----------------------------------------------------------------------------------------------
# Classification from features
# ----------------------------------------------------------------------------------------------


def _as_features(feats, name: str) -> Tensor:
    t = torch.as_tensor(feats).detach()
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a (n, d) feature matrix, got shape {tuple(t.shape)}")
    return t.float() if t.dtype != torch.float64 else t


def _as_labels(labels, n: int, name: str) -> Tensor:
    t = torch.as_tensor(labels).detach().cpu()
    if t.dim() != 1 or len(t) != n or t.is_floating_point():
        raise ValueError(f"{name}: expected ({n},) integer labels, got shape {tuple(t.shape)} {t.dtype}")
    return t.long()


def _check_train_test(train_feats, train_labels, test_feats, name: str) -> tuple[Tensor, Tensor, Tensor]:
    train = _as_features(train_feats, f"{name} train_feats")
    test = _as_features(test_feats, f"{name} test_feats")
    if train.shape[1] != test.shape[1]:
        raise ValueError(f"{name}: train and test feature dimensions differ: "
                         f"{train.shape[1]} vs {test.shape[1]}")
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"{name}: empty train ({len(train)}) or test ({len(test)}) set")
    y_train = _as_labels(train_labels, len(train), f"{name} train_labels")
    return train, y_train, test.to(train)


def knn_predict(train_feats, train_labels, test_feats, k: int = 20) -> Tensor:
    """k-nearest-neighbour labels under cosine similarity s(u, v) = uᵀv / (‖u‖‖v‖).

    Each test row takes the majority label of its k most similar training rows; a tie between labels
    goes to the one whose best-ranked neighbour comes first (so k = 1 is plain nearest neighbour).
    train_feats (n, d), train_labels (n,) int, test_feats (m, d) → (m,) int64 labels on the CPU.
    Works in blocks of KNN_CHUNK test rows on the features' device.
    """
    if k < 1:
        raise ValueError(f"knn: k={k} must be >= 1")
    train, y_train, test = _check_train_test(train_feats, train_labels, test_feats, "knn")
    if k > len(train):
        raise ValueError(f"knn: k={k} exceeds the number of training samples ({len(train)})")
    classes, y_idx = torch.unique(y_train, return_inverse=True)
    y_idx = y_idx.to(train.device)
    train = F.normalize(train, dim=1)
    ranks = torch.arange(k, device=train.device)
    preds = []
    for start in range(0, len(test), KNN_CHUNK):
        sims = F.normalize(test[start:start + KNN_CHUNK].to(train.device), dim=1) @ train.T
        nn_idx = sims.topk(k, dim=1).indices  # (m, k), most similar first
        nn_cls = y_idx[nn_idx]
        votes = torch.zeros(len(nn_cls), len(classes), dtype=torch.long, device=train.device)
        votes.scatter_add_(1, nn_cls, torch.ones_like(nn_cls))
        # Rank of each class's first neighbour (k when absent): ties in votes go to the earliest.
        first = torch.full_like(votes, k).scatter_reduce_(
            1, nn_cls, ranks.expand_as(nn_cls), reduce="amin")
        score = votes * (k + 1) + (k - first)  # lexicographic (votes, −first rank); first ≤ k
        preds.append(score.argmax(1).cpu())
    return classes[torch.cat(preds)]


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k: int = 20) -> float:
    """Fraction of test rows whose cosine k-NN majority label (`knn_predict`) equals the true label."""
    y_test = _as_labels(test_labels, len(test_feats), "knn_accuracy test_labels")
    return float((knn_predict(train_feats, train_labels, test_feats, k) == y_test).double().mean())


def class_subspaces(train_feats, train_labels, n_components: int) -> tuple[Tensor, Tensor]:
    """Per class j, the top-r principal subspace of its features, uncentered (as MCR²/CTRL do):
    Z_j = U Σ Vᵀ (rows are samples), basis B_j = first r right singular vectors, (d, r).

    Features live on the unit sphere and each class is modelled as a linear subspace through the
    origin, not an affine one, so the class mean is not subtracted. Classes with fewer than r samples
    keep all their n_j directions (the rest of the basis is zero columns, which project to 0).
    Returns (classes (k,), bases (k, d, r)).
    """
    train = _as_features(train_feats, "nearest_subspace train_feats")
    y_train = _as_labels(train_labels, len(train), "nearest_subspace train_labels")
    if not 1 <= n_components <= train.shape[1]:
        raise ValueError(f"nearest_subspace: n_components={n_components} must be in [1, d={train.shape[1]}]")
    classes = torch.unique(y_train)
    bases = train.new_zeros(len(classes), train.shape[1], n_components)
    for j, cls in enumerate(classes):
        z_j = train[(y_train == cls).to(train.device)]
        _, _, vh = torch.linalg.svd(z_j, full_matrices=False)  # vh: (min(n_j, d), d)
        r = min(n_components, vh.shape[0])
        bases[j, :, :r] = vh[:r].T
    return classes, bases


def nearest_subspace_predict(train_feats, train_labels, test_feats, n_components: int) -> Tensor:
    """Label of the class subspace with the smallest residual ‖(I − B_j B_jᵀ) z‖ (`class_subspaces`).

    With orthonormal B_j, ‖(I − B_j B_jᵀ) z‖² = ‖z‖² − ‖B_jᵀ z‖², so the arg-min is the class with
    the largest projection energy ‖B_jᵀ z‖². Returns (m,) int64 labels on the CPU.
    """
    train, y_train, test = _check_train_test(train_feats, train_labels, test_feats, "nearest_subspace")
    classes, bases = class_subspaces(train, y_train, n_components)
    preds = []
    for start in range(0, len(test), KNN_CHUNK):
        z = test[start:start + KNN_CHUNK]
        energy = torch.einsum("md,kdr->mkr", z, bases).square().sum(-1)  # ‖B_jᵀ z‖², (m, k)
        preds.append(energy.argmax(1).cpu())
    return classes[torch.cat(preds)]


def nearest_subspace_accuracy(train_feats, train_labels, test_feats, test_labels,
                              n_components: int = 12) -> float:
    """Fraction of test rows classified correctly by the nearest class subspace (uncentered SVD)."""
    y_test = _as_labels(test_labels, len(test_feats), "nearest_subspace_accuracy test_labels")
    preds = nearest_subspace_predict(train_feats, train_labels, test_feats, n_components)
    return float((preds == y_test).double().mean())


# ----------------------------------------------------------------------------------------------
# Sparse codes
# ----------------------------------------------------------------------------------------------


def sparsity(code: Tensor, threshold: float = 0.0) -> Tensor:
    """Fraction of non-zero entries, (1/N) Σ 1[|z| > threshold], of a code of any shape.

    With the ReLU / soft-threshold proximal maps of the CSC layers, codes have exact zeros, so the
    default threshold 0 counts exact non-zeros. Returns a 0-d float tensor on the code's device
    (no host synchronisation).
    """
    return (code.detach().abs() > threshold).float().mean()


def atom_usage(code: Tensor, threshold: float = 0.0) -> Tensor:
    """Per atom m, the fraction of non-zero entries of its code map: (b, M, h, w) → (M,).

    The values a per-stage sparsity histogram shows (dead atoms at 0, dense ones near 1).
    """
    if code.dim() != 4:
        raise ValueError(f"atom_usage: expected a code (b, num_atoms, h, w), got shape {tuple(code.shape)}")
    return (code.detach().abs() > threshold).float().mean(dim=(0, 2, 3))

