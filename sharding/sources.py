"""Image sources: what can be sharded, listed as (key, label, source path) per split.

A source lists its samples up front (`Source.list()` -> `Listing`) and reads one sample's encoded
bytes on demand (`Source.read(item)`), so the shard plan can be fixed before any image is decoded and
any worker process can read any sample. Sources are small picklable objects (a root path and options).

Sources:

- `ImageNetSource`: the ILSVRC-2012 CLS-LOC layout as distributed: ``train/<wnid>/<wnid>_<n>.JPEG``;
  ``val/`` either flat with ``LOC_val_solution.csv`` (columns ImageId,PredictionString; the first
  token of PredictionString is the wnid) or ``val/<wnid>/``; class descriptions from
  ``LOC_synset_mapping.txt`` ("n01440764 tench, Tinca tinca") when present. SOURCE may be the folder
  holding train/ and val/, or the Kaggle top level holding ``ILSVRC/Data/CLS-LOC``.
  Class index = sorted wnids of train/ (the usual 0..999 order).
- `ImageFolderSource`: any class-per-folder tree, ``ROOT/<class>/**/<image>`` (one split, "train"), or
  ``ROOT/<split>/<class>/**/<image>`` when ROOT holds split folders (train, val, test, unseen).
- `FashionMNISTSource`: the IDX files of the Debian package ``dataset-fashion-mnist``; splits train
  (60 000) and val (the 10 000 test images); 28×28 grey PNGs.
- `DemoSource`: the embedded default: deterministic random crops of real photos that ship inside
  scikit-image and scikit-learn; label = which photo. Splits train and val are crops of the same six
  colour photos; split ``unseen`` holds crops of four other photos (generalisation tests). Unseen
  labels come after the training labels (6..9), so ``num_classes_in("train")`` is 6.

Keys are stable ids derived from relative paths, without dots (WebDataset splits a member name at
its first dot): ``n01440764_10026``, ``dog_img_001``.
"""
from __future__ import annotations

import builtins
import csv
import errno
import functools
import gzip
import hashlib
import importlib.util
import io
import logging
import os
import re
import stat
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from sharding.images import RejectedImage

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                              ".ppm", ".pgm", ".pbm"})
SPLIT_FOLDER_NAMES = ("train", "val", "validation", "test", "unseen")
SPLIT_ORDER = ("train", "val", "unseen", "test")  # canonical order of splits in listings
WNID = re.compile(r"^n\d{8}$")
KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")

NAMED_SOURCES = ("demo", "fashion-mnist")
GENERATED_PNG_LEVEL = 1  # zlib level of generated PNGs (demo crops, Fashion-MNIST): small images, fast


class SourceError(ValueError):
    """SOURCE cannot be sharded (missing, empty class folder, unlabelled layout, ...)."""


@dataclass(frozen=True)
class SourceItem:
    """One sample as listed: ``source`` is relative to the source root ('/'-separated) or a locator."""

    key: str
    label: int
    source: str
    size: int  # source bytes when known (shard size planning), else an estimate


@dataclass(frozen=True)
class ListedReject:
    split: str
    source: str
    reason: str


@dataclass(frozen=True)
class ClassInfo:
    label: int
    name: str  # folder name / wnid / photo name
    description: str = ""  # synset words or a human-readable name


@dataclass
class Listing:
    splits: dict[str, list[SourceItem]]
    classes: list[ClassInfo]
    rejected: list[ListedReject] = field(default_factory=list)


class Source(ABC):
    """A picklable description of where samples come from."""

    kind: str = ""

    @abstractmethod
    def describe(self) -> dict:
        """JSON-able identity (kind, root, options): part of the plan fingerprint."""

    @abstractmethod
    def list(self) -> Listing:
        """All samples per split, classes, and files rejected while listing."""

    @abstractmethod
    def read(self, item: SourceItem) -> bytes:
        """Encoded bytes of one sample; raise RejectedImage when they cannot be read."""


# ----------------------------------------------------------------------------------------------
# Keys and file-tree scanning
# ----------------------------------------------------------------------------------------------
def key_from_relpath(relpath: str) -> str:
    """Stable key from a relative path: extension dropped, '/' and every character outside
    [A-Za-z0-9_-] replaced by '_' (so no dots: WebDataset splits member names at the first dot)."""
    stem = relpath.rsplit(".", 1)[0] if "." in relpath.rsplit("/", 1)[-1] else relpath
    key = KEY_UNSAFE.sub("_", stem).strip("_")
    return key or "_"


def unique_keys(relpaths: list[str], make_key=key_from_relpath) -> list[str]:
    """Keys for `relpaths`; the rare collisions after sanitising get an 8-hex suffix of the path."""
    keys = [make_key(p) for p in relpaths]
    counts = Counter(keys)
    return [k if counts[k] == 1 else f"{k}_{hashlib.sha1(p.encode()).hexdigest()[:8]}"
            for k, p in zip(keys, relpaths)]


def _oserror_reason(exc: OSError, missing: str = "broken symlink (target missing)") -> str:
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if exc.errno == errno.ENOENT:
        return missing
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return exc.strerror or str(exc)


def scan_images(root: Path, start: Path) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """Image files under `start` (recursive, following directory symlinks once each).

    Returns ([(relpath to root, bytes)], [(relpath, reject reason)]); both sorted by path. Hidden
    entries (name starting with '.') are skipped; files with other extensions are ignored.
    """
    found: list[tuple[str, int]] = []
    bad: list[tuple[str, str]] = []
    seen_dirs: set[str] = set()
    stack = [start]
    while stack:
        directory = stack.pop()
        rel_dir = directory.relative_to(root).as_posix()
        real = os.path.realpath(directory)
        if real in seen_dirs:
            bad.append((rel_dir, "directory symlink loop (already visited)"))
            continue
        seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            bad.append((rel_dir, f"directory unreadable: {_oserror_reason(exc)}"))
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = (directory / entry.name).relative_to(root).as_posix()
            if not utf8_name(entry.name):
                bad.append((printable_path(rel), "file name is not valid UTF-8: rename it (e.g. convmv -f latin1 "
                                                 "-t utf8) to include it"))
                continue
            is_image_name = Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS
            try:
                st = os.stat(entry.path)  # follows symlinks
            except OSError as exc:
                if is_image_name or entry.is_symlink():
                    bad.append((rel, _oserror_reason(exc)))
                continue
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(directory / entry.name)
            elif stat.S_ISREG(st.st_mode) and is_image_name:
                found.append((rel, st.st_size))
        stack.extend(reversed(subdirs))
    return sorted(found), sorted(bad)


def _read_file(root: str, relpath: str) -> bytes:
    try:
        with open(os.path.join(root, relpath), "rb") as f:
            return f.read()
    except OSError as exc:
        raise RejectedImage(f"cannot read file: {_oserror_reason(exc, missing='file vanished since listing')}") from exc


def _ordered(splits: dict[str, list[SourceItem]]) -> dict[str, list[SourceItem]]:
    order = {s: i for i, s in enumerate(SPLIT_ORDER)}
    return {s: splits[s] for s in sorted(splits, key=lambda s: (order.get(s, len(order)), s))}


def _subdirs(path: Path) -> list[Path]:
    """Visible subfolders; one whose name is not valid UTF-8 is left out (it cannot name a class or a key:
    ImageFolderSource lists it as rejected, naming it)."""
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".") and utf8_name(p.name))


def utf8_name(name: str) -> bool:
    """Whether a file name (as os.fsdecode gives it) is valid UTF-8: undecodable bytes come back as lone
    surrogates, which no manifest, tar member or log line can hold."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_path(path: str) -> str:
    """A path with any bytes that are not UTF-8 shown as \\xNN escapes (for reject lists and messages)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


# ----------------------------------------------------------------------------------------------
# Class-per-folder trees
# ----------------------------------------------------------------------------------------------
class ImageFolderSource(Source):
    """``ROOT/<class>/**/*`` or ``ROOT/<split>/<class>/**/*``; class index = sorted class names."""

    kind = "image-folder"

    def __init__(self, root: str | os.PathLike):
        self.root = os.path.abspath(root)

    def describe(self) -> dict:
        return {"kind": self.kind, "root": self.root}

    def split_dirs(self) -> dict[str, Path]:
        root = Path(self.root)
        named = {p.name: p for p in _subdirs(root) if p.name in SPLIT_FOLDER_NAMES and _subdirs(p)}
        if "train" in named:
            return {("val" if name == "validation" else name): p for name, p in named.items()}
        return {"train": root}

    def list(self) -> Listing:
        root = Path(self.root)
        split_dirs = self.split_dirs()
        class_dirs = {split: _subdirs(d) for split, d in split_dirs.items()}
        names = sorted({d.name for dirs in class_dirs.values() for d in dirs})
        undecodable = [ListedReject(split, printable_path(p.relative_to(root).as_posix()),
                                    "folder name is not valid UTF-8: rename it to include its images")
                       for split, d in split_dirs.items() for p in sorted(d.iterdir())
                       if p.is_dir() and not p.name.startswith(".") and not utf8_name(p.name)]
        if not names:
            raise SourceError(f"SOURCE {self.root!r} holds no class folders (expected ROOT/<class>/<image>)")
        label_of = {n: i for i, n in enumerate(names)}
        splits: dict[str, list[SourceItem]] = {}
        rejected: list[ListedReject] = undecodable
        for split, dirs in class_dirs.items():
            rel_items: list[tuple[str, int, int]] = []
            for class_dir in dirs:
                found, bad = scan_images(root, class_dir)
                rejected += [ListedReject(split, rel, reason) for rel, reason in bad]
                if not found:
                    raise SourceError(f"class folder {str(class_dir)!r} contains no images "
                                      f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
                rel_items += [(rel, size, label_of[class_dir.name]) for rel, size in found]
            split_prefix = split_dirs[split].relative_to(root).as_posix()
            inner = [r[0][len(split_prefix) + 1:] if split_prefix != "." else r[0] for r in rel_items]
            keys = unique_keys(inner)
            splits[split] = [SourceItem(k, label, rel, size) for k, (rel, size, label) in zip(keys, rel_items)]
        return Listing(_ordered(splits), [ClassInfo(i, n) for i, n in enumerate(names)], rejected)

    def read(self, item: SourceItem) -> bytes:
        return _read_file(self.root, item.source)


# ----------------------------------------------------------------------------------------------
# ImageNet (ILSVRC-2012 CLS-LOC) as distributed
# ----------------------------------------------------------------------------------------------
VAL_SOLUTION = "LOC_val_solution.csv"
SYNSET_MAPPING = "LOC_synset_mapping.txt"


def imagenet_image_root(root: Path) -> Path | None:
    """The folder holding train/<wnid>/ (ROOT itself or ROOT/ILSVRC/Data/CLS-LOC), or None."""
    for candidate in (root, root / "ILSVRC" / "Data" / "CLS-LOC"):
        train = candidate / "train"
        if train.is_dir():
            dirs = _subdirs(train)
            if dirs and all(WNID.match(d.name) for d in dirs):
                return candidate
    return None


def read_synset_mapping(path: Path) -> dict[str, str]:
    """``n01440764 tench, Tinca tinca`` per line -> {wnid: description}."""
    mapping = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, words = line.strip().partition(" ")
        if not WNID.match(wnid):
            raise SourceError(f"{path}:{lineno}: expected '<wnid> <words>', got {line!r}")
        mapping[wnid] = words.strip()
    return mapping


def read_val_solution(path: Path) -> dict[str, str]:
    """``ImageId,PredictionString`` rows -> {ImageId: wnid}, the wnid being PredictionString's first token."""
    labels = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
            raise SourceError(f"{path}: expected columns ImageId,PredictionString, got {reader.fieldnames}")
        for row in reader:
            tokens = (row["PredictionString"] or "").split()
            if not tokens or not WNID.match(tokens[0]):
                raise SourceError(f"{path}: row {row['ImageId']!r} has no wnid at the start of PredictionString")
            labels[row["ImageId"]] = tokens[0]
    return labels


class ImageNetSource(Source):
    kind = "imagenet"

    def __init__(self, root: str | os.PathLike):
        self.root = os.path.abspath(root)
        image_root = imagenet_image_root(Path(self.root))
        if image_root is None:
            raise SourceError(f"{self.root!r} is not in the ImageNet layout (train/<wnid>/...)")
        self.image_root = str(image_root)

    def describe(self) -> dict:
        return {"kind": self.kind, "root": self.root}

    def _find(self, name: str) -> Path | None:
        """Metadata files live next to ILSVRC/ in the Kaggle layout, or next to train/ and val/."""
        image_root, root = Path(self.image_root), Path(self.root)
        candidates = [image_root, image_root / "val", root]
        candidates += [p for p in image_root.parents if root in (p, *p.parents)]
        return next((p / name for p in candidates if (p / name).is_file()), None)

    def list(self) -> Listing:
        image_root = Path(self.image_root)
        wnids = [d.name for d in _subdirs(image_root / "train")]
        mapping_path = self._find(SYNSET_MAPPING)
        words = read_synset_mapping(mapping_path) if mapping_path else {}
        unknown = [w for w in wnids if words and w not in words]
        if unknown:
            raise SourceError(f"train/ classes {unknown[:5]} are missing from {mapping_path}")
        label_of = {w: i for i, w in enumerate(wnids)}
        classes = [ClassInfo(i, w, words.get(w, "")) for i, w in enumerate(wnids)]
        rejected: list[ListedReject] = []
        splits = {"train": self._list_class_folders(image_root / "train", label_of, "train", rejected)}
        val = image_root / "val"
        if val.is_dir():
            if any(WNID.match(d.name) for d in _subdirs(val)):
                splits["val"] = self._list_class_folders(val, label_of, "val", rejected)
            else:
                splits["val"] = self._list_flat_val(val, label_of, rejected)
        if (image_root / "test").is_dir():
            log.info("ImageNet test/ has no labels; it is not sharded")
        return Listing(splits, classes, rejected)

    def _rel(self, path: str) -> str:
        return Path(path).relative_to(self.root).as_posix()

    # builtins.list: inside this class body, `list` names the method ImageNetSource.list
    def _list_class_folders(self, split_dir: Path, label_of: dict[str, int], split: str,
                            rejected: builtins.list[ListedReject]) -> builtins.list[SourceItem]:
        items = []
        root = Path(self.root)
        for class_dir in _subdirs(split_dir):
            if class_dir.name not in label_of:
                rejected.append(ListedReject(split, self._rel(str(class_dir)),
                                             f"class {class_dir.name} is not in train/"))
                continue
            found, bad = scan_images(root, class_dir)
            rejected += [ListedReject(split, rel, reason) for rel, reason in bad]
            if not found:
                raise SourceError(f"class folder {str(class_dir)!r} contains no images")
            items += [(rel, size, label_of[class_dir.name]) for rel, size in found]
        keys = unique_keys([rel for rel, _, _ in items], make_key=lambda p: key_from_relpath(p.rsplit("/", 1)[-1]))
        return [SourceItem(k, label, rel, size) for k, (rel, size, label) in zip(keys, items)]

    def _list_flat_val(self, val: Path, label_of: dict[str, int],
                       rejected: builtins.list[ListedReject]) -> builtins.list[SourceItem]:
        solution = self._find(VAL_SOLUTION)
        if solution is None:
            raise SourceError(f"{str(val)!r} is flat (no val/<wnid>/ folders) but no {VAL_SOLUTION} was found "
                              f"next to it or in {self.root!r}")
        wnid_of = read_val_solution(solution)
        found, bad = scan_images(Path(self.root), val)
        rejected += [ListedReject("val", rel, reason) for rel, reason in bad]
        items = []
        for rel, size in found:
            image_id = rel.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            wnid = wnid_of.get(image_id)
            if wnid is None:
                rejected.append(ListedReject("val", rel, f"no label for {image_id} in {VAL_SOLUTION}"))
            elif wnid not in label_of:
                rejected.append(ListedReject("val", rel, f"class {wnid} is not in train/"))
            else:
                items.append((rel, size, label_of[wnid]))
        keys = unique_keys([rel for rel, _, _ in items], make_key=lambda p: key_from_relpath(p.rsplit("/", 1)[-1]))
        return [SourceItem(k, label, rel, size) for k, (rel, size, label) in zip(keys, items)]

    def read(self, item: SourceItem) -> bytes:
        return _read_file(self.root, item.source)


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST from the Debian package
# ----------------------------------------------------------------------------------------------
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist", "/usr/share/fashion-mnist",
                      "/usr/share/dataset-fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions (n, rows, cols)
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension (n,)
FASHION_MNIST_PNG_BYTES = 400  # typical PNG size of one 28×28 image, for shard size planning


def find_fashion_mnist() -> Path | None:
    """Folder with the IDX files (``CSCCTRL_FASHION_MNIST_DIR`` or the Debian package's), or None."""
    candidates = [os.environ.get("CSCCTRL_FASHION_MNIST_DIR", ""), *FASHION_MNIST_DIRS]
    for c in candidates:
        if c and any(Path(c).glob("train-images-idx3-ubyte*")):
            return Path(c)
    return None


def _idx_path(directory: str, stem: str) -> str:
    for suffix in ("", ".gz"):
        if os.path.isfile(os.path.join(directory, stem + suffix)):
            return os.path.join(directory, stem + suffix)
    raise SourceError(f"{stem}[.gz] not found in {directory!r}")


@functools.lru_cache(maxsize=4)
def read_idx(path: str) -> np.ndarray:
    """Parse an IDX file (optionally gzip'd): big-endian magic, dims, then uint8 data."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    ndim = magic & 0xFF
    if magic not in (IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC):
        raise SourceError(f"{path}: not an unsigned-byte IDX file (magic {magic:#010x})")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise SourceError(f"{path}: header says {dims} = {int(np.prod(dims))} bytes, file holds {data.size}")
    return data.reshape(dims)


class FashionMNISTSource(Source):
    kind = "fashion-mnist"

    def __init__(self, directory: str | os.PathLike | None = None):
        found = Path(directory) if directory else find_fashion_mnist()
        if found is None:
            raise SourceError("Fashion-MNIST not found: install the Debian package `dataset-fashion-mnist` "
                              "(apt-get install dataset-fashion-mnist; scripts/setup.sh does it as root) "
                              f"or set CSCCTRL_FASHION_MNIST_DIR; looked in {', '.join(FASHION_MNIST_DIRS)}")
        self.directory = str(found)

    def describe(self) -> dict:
        return {"kind": self.kind, "directory": self.directory}

    def list(self) -> Listing:
        splits = {}
        for split, (images_stem, labels_stem) in FASHION_MNIST_FILES.items():
            images = read_idx(_idx_path(self.directory, images_stem))
            labels = read_idx(_idx_path(self.directory, labels_stem))
            if images.shape[0] != labels.shape[0]:
                raise SourceError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels")
            name = os.path.basename(_idx_path(self.directory, images_stem))
            splits[split] = [SourceItem(f"fmnist_{split}_{i:05d}", int(labels[i]), f"{name}#{i}",
                                        FASHION_MNIST_PNG_BYTES) for i in range(images.shape[0])]
        classes = [ClassInfo(i, n) for i, n in enumerate(FASHION_MNIST_CLASSES)]
        return Listing(splits, classes)

    def read(self, item: SourceItem) -> bytes:
        name, index = item.source.rsplit("#", 1)
        images = read_idx(os.path.join(self.directory, name))
        buf = io.BytesIO()
        Image.fromarray(images[int(index)], mode="L").save(buf, format="PNG", compress_level=GENERATED_PNG_LEVEL)
        return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# Demo: random crops of the real photos bundled with scikit-image / scikit-learn
# ----------------------------------------------------------------------------------------------
DEMO_TRAIN_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "china", "flower")
DEMO_UNSEEN_PHOTOS = ("camera", "coins", "hubble_deep_field", "immunohistochemistry")
SKLEARN_PHOTOS = ("china", "flower")  # sklearn/datasets/images/<name>.jpg (load_sample_image's files)
DEMO_CROP_FRACTION = (0.2, 0.6)  # crop side as a fraction of the photo's shorter side
DEMO_SPLIT_STREAMS = {"train": 1, "val": 2, "unseen": 3}  # independent RNG streams per split


@functools.lru_cache(maxsize=16)
def load_photo(name: str) -> np.ndarray:
    """A bundled photo as uint8 (h, w) or (h, w, 3); nothing is downloaded."""
    if name in SKLEARN_PHOTOS:
        # The file sklearn.datasets.load_sample_image reads, opened directly: importing
        # sklearn.datasets costs seconds in every worker process.

        package = importlib.util.find_spec("sklearn")
        if package is None or package.origin is None:
            raise SourceError("the demo source needs scikit-learn (its bundled sample photos)")
        with Image.open(Path(package.origin).parent / "datasets" / "images" / f"{name}.jpg") as im:
            return np.asarray(im.convert("RGB"))
    import skimage.data

    return np.asarray(getattr(skimage.data, name)())


class DemoSource(Source):
    """Square crops (side ~ U[crop] of the photo's shorter side, uniform position) resized to `size`.

    The class of a crop is its photo. Small crops (the default) are varied textures; large ones
    (e.g. ``crop=(0.8, 1.0)``) are jittered views of the whole photo, so each class is a tight cluster."""

    kind = "demo"

    def __init__(self, seed: int = 0, train: int = 4096, val: int = 512, unseen: int = 512, size: int = 64,
                 crop: tuple[float, float] | list[float] = DEMO_CROP_FRACTION):
        for name, n in (("train", train), ("val", val), ("unseen", unseen)):
            if n < 0:
                raise SourceError(f"demo {name} count must be >= 0, got {n}")
        if not 8 <= size <= 512:
            raise SourceError(f"demo crop size must be in [8, 512] pixels, got {size}")
        lo, hi = (float(v) for v in crop)
        if not 0.0 < lo <= hi <= 1.0:
            raise SourceError(f"demo crop must be (min, max) fractions of the shorter side with 0 < min <= max <= 1, "
                              f"got {tuple(crop)}")
        self.seed, self.size, self.crop = int(seed), int(size), (lo, hi)
        self.counts = {"train": int(train), "val": int(val), "unseen": int(unseen)}

    def describe(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "size": self.size, "counts": self.counts,
                "crop": list(self.crop)}

    def list(self) -> Listing:
        photos = DEMO_TRAIN_PHOTOS + DEMO_UNSEEN_PHOTOS
        classes = [ClassInfo(i, p) for i, p in enumerate(photos)]
        splits = {}
        for split, n in self.counts.items():
            if n == 0:
                continue
            pool = DEMO_UNSEEN_PHOTOS if split == "unseen" else DEMO_TRAIN_PHOTOS
            offset = len(DEMO_TRAIN_PHOTOS) if split == "unseen" else 0
            rng = np.random.default_rng([self.seed, DEMO_SPLIT_STREAMS[split]])
            items = []
            for i in range(n):
                k = i % len(pool)  # balanced classes
                h, w = load_photo(pool[k]).shape[:2]
                side = max(1, int(rng.uniform(*self.crop) * min(h, w)))
                y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
                items.append(SourceItem(f"demo_{split}_{i:06d}", offset + k,
                                        f"{pool[k]}#{y0},{x0},{side}", 3 * self.size * self.size))
            splits[split] = items
        return Listing(splits, classes)

    def read(self, item: SourceItem) -> bytes:
        name, box = item.source.rsplit("#", 1)
        y0, x0, side = (int(v) for v in box.split(","))
        crop = load_photo(name)[y0:y0 + side, x0:x0 + side]
        im = Image.fromarray(crop).resize((self.size, self.size), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="PNG", compress_level=GENERATED_PNG_LEVEL)
        return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# SOURCE argument -> Source
# ----------------------------------------------------------------------------------------------
def open_source(spec: str, **demo_options) -> Source:
    """``demo`` | ``fashion-mnist`` | a local folder (ImageNet layout auto-detected, else class folders).
    Options are the demo source's; any other source refuses them (after checking that it exists)."""
    if spec == "demo":
        return DemoSource(**demo_options)
    source = FashionMNISTSource() if spec == "fashion-mnist" else _open_folder(spec)
    if demo_options:
        raise SourceError(f"source {spec!r} takes no source_options (only the demo source does), got "
                          f"{', '.join(sorted(demo_options))}")
    return source


def _open_folder(spec: str) -> Source:
    path = Path(spec).expanduser()
    if not path.exists():
        raise SourceError(f"SOURCE {spec!r} does not exist (and is not a named source: {', '.join(NAMED_SOURCES)})")
    if not path.is_dir():
        raise SourceError(f"SOURCE {spec!r} is not a directory")
    if imagenet_image_root(path) is not None:
        return ImageNetSource(path)
    return ImageFolderSource(path)
