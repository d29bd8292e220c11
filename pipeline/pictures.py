"""Pictures of a CSC-CTRL model for people (docs/method.md §7): image grids, real-vs-reconstruction grids,
dictionary atoms, code activation maps, sparsity histograms and training curves, as PIL images.

Images are float tensors in [-1, 1], (b, c, h, w), c ∈ {1, 3}; they become 8-bit pixels by
p = round(255 · (x + 1) / 2), clamped to 0…255. Plots use matplotlib's Agg canvas directly (no pyplot
state, safe in workers without a display), imported where a picture is drawn: matplotlib's import is slow
and most importers of this module only make grids. Nothing here calls back into the models: the caller passes
tensors (dictionary weights, codes, decoded one-hot codes) it computed.
"""
from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

PAD_VALUE = 255  # 8-bit value of the gaps between tiles (white)
HEATMAP_CMAP = "viridis"  # colour map of the code activation maps
FIGURE_DPI = 100


# ----------------------------------------------------------------------------------------------
# Tensors → 8-bit tiles → one image
# ----------------------------------------------------------------------------------------------


def to_uint8(x: Tensor) -> np.ndarray:
    """Images in [-1, 1], (b, c, h, w) with c ∈ {1, 3} → uint8 (b, h, w, c), p = round(255 (x + 1) / 2)."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (b, 1 or 3, h, w) in [-1, 1], got shape {tuple(x.shape)}")
    pixels = ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255)
    return pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def unit_to_uint8(x: Tensor) -> np.ndarray:
    """Images in [0, 1], (b, c, h, w) → uint8 (b, h, w, c), p = round(255 x)."""
    return to_uint8(x * 2.0 - 1.0)


def tile(tiles: Sequence[np.ndarray | None], nrow: int, padding: int = 2) -> Image.Image:
    """Arrange equal-size uint8 tiles (h, w, c) row by row, `nrow` per row, `padding` pixels of
    PAD_VALUE between and around them; a None entry leaves its slot empty. c = 1 gives a greyscale
    image, c = 3 an RGB one."""
    present = [t for t in tiles if t is not None]
    if not present:
        raise ValueError("tile: no images to arrange")
    h, w, c = present[0].shape
    if any(t.shape != (h, w, c) for t in present):
        raise ValueError(f"tile: all tiles must have shape {(h, w, c)}, got {sorted({t.shape for t in present})}")
    if nrow < 1 or padding < 0:
        raise ValueError(f"tile: nrow={nrow} must be >= 1 and padding={padding} >= 0")
    cols = min(nrow, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    canvas = np.full((padding + rows * (h + padding), padding + cols * (w + padding), c), PAD_VALUE, np.uint8)
    for i, t in enumerate(tiles):
        if t is not None:
            top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
            canvas[top:top + h, left:left + w] = t
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)  # 2-D uint8 → "L", (h, w, 3) → "RGB"


def image_grid(x: Tensor, nrow: int = 8, padding: int = 2) -> Image.Image:
    """A grid of images in [-1, 1], (b, c, h, w): `nrow` images per row, `padding` pixels between.

    Tile i sits at top = padding + (i // nrow)(h + padding), left = padding + (i % nrow)(w + padding).
    """
    return tile(list(to_uint8(x)), nrow, padding)


def recon_grid(x: Tensor, x_hat: Tensor, n: int = 32, ncol: int = 8, padding: int = 2) -> Image.Image:
    """Real images above their reconstructions: the first n of x and x̂ = g(f(x)), ncol per row,
    as alternating row pairs (row 2r: x[r·ncol : (r+1)·ncol], row 2r+1: the same x̂)."""
    if x.shape != x_hat.shape:
        raise ValueError(f"recon_grid: x and x_hat must have one shape, got {tuple(x.shape)} and "
                         f"{tuple(x_hat.shape)}")
    real, recon = to_uint8(x[:n]), to_uint8(x_hat[:n])
    ncol = max(1, min(ncol, len(real)))
    slots: list[np.ndarray | None] = []
    for start in range(0, len(real), ncol):
        blank = [None] * (ncol - len(real[start:start + ncol]))
        slots += list(real[start:start + ncol]) + blank + list(recon[start:start + ncol]) + blank
    return tile(slots, ncol, padding)


def minmax_normalise(t: Tensor) -> Tensor:
    """Each item of (n, …) scaled to [0, 1] on its own: (t − min t) / (max t − min t); constant items
    become 0.5."""
    flat = t.detach().float().cpu().flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    span = hi - lo
    scaled = torch.where(span > 0, (flat - lo) / span.clamp_min(torch.finfo(flat.dtype).tiny), 0.5)
    return scaled.view_as(t)


LUMA_WEIGHTS = (0.299, 0.587, 0.114)
"""ITU-R BT.601 luminance weights of (R, G, B), as Pillow's convert("L")."""


def luminance(weight: Tensor) -> Tensor:
    """The luminance of colour atoms (M, 3, k, k) → (M, 1, k, k): Σ_c w_c a_c with LUMA_WEIGHTS; the
    structure of an atom without its colour (a one-channel weight is returned as it is)."""
    if weight.dim() != 4 or weight.shape[1] not in (1, 3):
        raise ValueError(f"luminance: expected atoms (M, 1 or 3, k, k), got shape {tuple(weight.shape)}")
    if weight.shape[1] == 1:
        return weight
    w = torch.tensor(LUMA_WEIGHTS, dtype=weight.dtype, device=weight.device).view(1, 3, 1, 1)
    return (weight * w).sum(1, keepdim=True)


def atom_tiles(weight: Tensor, nrow: int = 0, zoom: int = 4, padding: int = 1,
               channels: str = "mean") -> Image.Image:
    """A dictionary (num_atoms, c, k, k) as a tile image, each atom min-max normalised to [0, 1] on its own.

    c = 3 (the first stage, whose atoms live in pixel space) is shown as RGB, c = 1 as grey; other c
    as grey from the mean over channels (channels="mean") or the first channel ("first"). Atoms are
    enlarged `zoom` times by pixel repetition; nrow = 0 picks ⌈√num_atoms⌉ per row.
    (The weight of conv_transpose2d(z, W) is (in = atoms, out = c, k, k): exactly this layout.)
    """
    if weight.dim() != 4:
        raise ValueError(f"atom_tiles: expected a dictionary (num_atoms, c, k, k), got shape {tuple(weight.shape)}")
    if channels not in ("mean", "first"):
        raise ValueError(f"atom_tiles: channels={channels!r}: expected 'mean' or 'first'")
    w = weight.detach().float().cpu()
    if w.shape[1] not in (1, 3):
        w = w.mean(1, keepdim=True) if channels == "mean" else w[:, :1]
    return _normalised_tiles(w, nrow, zoom, padding)


def decoded_atom_tiles(images: Tensor, nrow: int = 0, zoom: int = 1, padding: int = 1) -> Image.Image:
    """Atoms of a deeper stage seen in pixel space: the images (num_atoms, c, h, w) the decoder made
    from one-hot codes (one per atom), each min-max normalised to [0, 1] on its own (their range is
    arbitrary) and tiled as in atom_tiles."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"decoded_atom_tiles: expected images (num_atoms, 1 or 3, h, w), got shape "
                         f"{tuple(images.shape)}")
    return _normalised_tiles(images.detach().float().cpu(), nrow, zoom, padding)


def _normalised_tiles(t: Tensor, nrow: int, zoom: int, padding: int) -> Image.Image:
    if zoom < 1:
        raise ValueError(f"zoom={zoom} must be >= 1")
    unit = minmax_normalise(t).repeat_interleave(zoom, 2).repeat_interleave(zoom, 3)
    return tile(list(unit_to_uint8(unit)), nrow or math.ceil(math.sqrt(len(t))), padding)


# ----------------------------------------------------------------------------------------------
# Code activation maps
# ----------------------------------------------------------------------------------------------


def activation_map(code: Tensor) -> Tensor:
    """Mean code magnitude over atoms, a(i, j) = (1/M) Σₘ |z[m, i, j]|: (b, M, h, w) → (b, h, w)."""
    return code.detach().float().abs().mean(1).cpu()


def heatmap(values: Tensor, size: tuple[int, int]) -> np.ndarray:
    """(h, w) values → uint8 RGB (H, W, 3): min-max normalised, enlarged to `size` by nearest
    neighbour (one code position stays one visible block), coloured with HEATMAP_CMAP."""
    unit = minmax_normalise(values[None])[0]
    big = torch.nn.functional.interpolate(unit[None, None], size=size, mode="nearest")[0, 0]
    import matplotlib

    rgba = matplotlib.colormaps[HEATMAP_CMAP](big.numpy())
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def code_activation_maps(codes_per_stage: Sequence[Tensor], image: Tensor, n: int = 4,
                         padding: int = 2) -> Image.Image:
    """For the first n images, one row: the image, then per encoder stage ℓ the heat map of
    (1/M_ℓ) Σₘ |z_ℓ[m]| (the mean absolute code over the stage's atoms), each map scaled to its own
    min…max and shown at the image's size.

    codes_per_stage: [(b, M_ℓ, h_ℓ, w_ℓ)] of the encoder's stages for the batch `image` (b, c, H, W).
    """
    if not codes_per_stage:
        raise ValueError("code_activation_maps: no codes given")
    if image.dim() != 4:
        raise ValueError(f"code_activation_maps: expected images (b, c, H, W), got shape {tuple(image.shape)}")
    for ell, code in enumerate(codes_per_stage):
        if code.dim() != 4 or code.shape[0] != image.shape[0]:
            raise ValueError(f"code_activation_maps: stage {ell + 1} code must be (b={image.shape[0]}, M, h, w), "
                             f"got {tuple(code.shape)}")
    size = tuple(image.shape[-2:])
    pictures = to_uint8(image[:n])
    if pictures.shape[-1] == 1:
        pictures = np.repeat(pictures, 3, axis=-1)  # one RGB canvas with the coloured maps
    maps = [activation_map(code[:n]) for code in codes_per_stage]
    slots = []
    for i in range(len(pictures)):
        slots.append(pictures[i])
        slots += [heatmap(m[i], size) for m in maps]
    return tile(slots, 1 + len(maps), padding)


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib Agg)
# ----------------------------------------------------------------------------------------------


def _figure(num_panels: int, panel_size: tuple[float, float] = (4.0, 3.0)) -> tuple[Any, list]:
    cols = min(num_panels, 3)
    rows = math.ceil(num_panels / cols)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel_size[0] * cols, panel_size[1] * rows), dpi=FIGURE_DPI)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(num_panels)]
    return fig, axes


def figure_to_image(fig: Any) -> Image.Image:
    """Render a matplotlib figure on an Agg canvas into an RGB PIL image."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return Image.fromarray(np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3]))


def _values(v) -> np.ndarray:
    if isinstance(v, Tensor):
        v = v.detach().float().cpu().numpy()
    return np.asarray(v, dtype=np.float64).ravel()


def sparsity_histogram(values_per_stage: Mapping[str, object] | Sequence[object], bins: int = 20,
                       value_range: tuple[float, float] = (0.0, 1.0),
                       xlabel: str = "fraction of non-zero code entries per atom") -> Image.Image:
    """One histogram per encoder stage of per-atom values (e.g. metrics.atom_usage: dead atoms at 0,
    dense ones at 1), with the stage's mean marked. values_per_stage: {name: values} or a list
    (named "stage 1", "stage 2", …); values are tensors, arrays or lists of floats."""
    named = (dict(values_per_stage) if isinstance(values_per_stage, Mapping)
             else {f"stage {i + 1}": v for i, v in enumerate(values_per_stage)})
    if not named:
        raise ValueError("sparsity_histogram: no stages given")
    fig, axes = _figure(len(named))
    for ax, (name, v) in zip(axes, named.items()):
        vals = _values(v)
        ax.hist(vals, bins=bins, range=value_range, color="tab:blue", edgecolor="white")
        if vals.size:
            ax.axvline(vals.mean(), color="tab:red", linestyle="--", label=f"mean {vals.mean():.3f}")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_title(f"{name} ({vals.size} atoms)", fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("atoms", fontsize=8)
    fig.tight_layout()
    return figure_to_image(fig)


def curves_plot(history: Mapping[str, Sequence[tuple[float, float]]], xlabel: str = "step") -> Image.Image:
    """One panel per metric of (step, value) points, e.g. {"encoder/delta_r_z": [(0, 1.2), (50, 3.4)],
    "eval/psnr": [...]}; points with a non-finite value (an inf PSNR) are left out."""
    if not history:
        raise ValueError("curves_plot: no curves given")
    fig, axes = _figure(len(history))
    for ax, (name, points) in zip(axes, history.items()):
        pts = np.asarray(list(points), dtype=np.float64).reshape(-1, 2)
        pts = pts[np.isfinite(pts).all(1)]
        ax.plot(pts[:, 0], pts[:, 1], marker="." if len(pts) < 50 else None, color="tab:blue")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return figure_to_image(fig)


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def png_bytes(img: Image.Image) -> bytes:
    """The image encoded as PNG."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_png(img: Image.Image, path: str | os.PathLike) -> str:
    """Write the image as a PNG file (parent folders created); returns the path as a string."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    img.save(path, format="PNG")
    return path
