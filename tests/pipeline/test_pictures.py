"""pipeline/pictures.py: grid geometry and pixel round trips, per-atom normalisation, activation maps,
and matplotlib plots rendered to real PNG files."""
from __future__ import annotations

import io

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import pictures
from pipeline.pictures import PAD_VALUE

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def quantised(b: int, c: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Random images on the exact 8-bit levels: x = p / 127.5 − 1 for integer p; returns (x, p (b, h, w, c))."""
    p = np.random.default_rng(seed).integers(0, 256, (b, h, w, c), dtype=np.uint8)
    x = torch.from_numpy(p.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    return x, p


def cell(grid: np.ndarray, row: int, col: int, h: int, w: int, padding: int) -> np.ndarray:
    top, left = padding + row * (h + padding), padding + col * (w + padding)
    return grid[top:top + h, left:left + w]


def test_to_uint8_maps_the_range_endpoints():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, -2.0]).view(1, 1, 1, 7)
    np.testing.assert_array_equal(pictures.to_uint8(x)[0, 0, :, 0], [0, 64, 128, 191, 255, 255, 0])


def test_image_grid_round_trips_a_2x2_grid_of_known_images():
    h, w, pad = 5, 7, 2
    x, p = quantised(4, 3, h, w)
    img = pictures.image_grid(x, nrow=2, padding=pad)
    assert img.mode == "RGB" and img.size == (pad + 2 * (w + pad), pad + 2 * (h + pad))
    grid = np.asarray(img)
    for i in range(4):
        np.testing.assert_array_equal(cell(grid, i // 2, i % 2, h, w, pad), p[i])
    # The gaps are PAD_VALUE: blank out the tiles and only padding is left.
    mask = np.ones(grid.shape[:2], bool)
    for i in range(4):
        top, left = pad + (i // 2) * (h + pad), pad + (i % 2) * (w + pad)
        mask[top:top + h, left:left + w] = False
    assert (grid[mask] == PAD_VALUE).all()


def test_image_grid_greyscale_and_partial_last_row():
    x, p = quantised(5, 1, 4, 4, seed=1)
    img = pictures.image_grid(x, nrow=3, padding=1)
    assert img.mode == "L" and img.size == (1 + 3 * 5, 1 + 2 * 5)
    grid = np.asarray(img)
    np.testing.assert_array_equal(cell(grid, 1, 1, 4, 4, 1), p[4, ..., 0])
    assert (cell(grid, 1, 2, 4, 4, 1) == PAD_VALUE).all()  # the sixth slot is empty


def test_image_grid_rejects_other_channel_counts():
    with pytest.raises(ValueError, match="1 or 3"):
        pictures.image_grid(torch.zeros(2, 4, 8, 8))


def test_recon_grid_puts_each_real_row_above_its_reconstructions():
    h = w = 6
    x, p = quantised(5, 3, h, w, seed=2)
    x_hat, p_hat = quantised(5, 3, h, w, seed=3)
    img = pictures.recon_grid(x, x_hat, n=5, ncol=3, padding=2)
    assert img.size == (2 + 3 * 8, 2 + 4 * 8)  # 3 columns; rows: real, recon, real, recon
    grid = np.asarray(img)
    for i in range(5):
        pair_row, col = 2 * (i // 3), i % 3
        np.testing.assert_array_equal(cell(grid, pair_row, col, h, w, 2), p[i])
        np.testing.assert_array_equal(cell(grid, pair_row + 1, col, h, w, 2), p_hat[i])
    assert (cell(grid, 2, 2, h, w, 2) == PAD_VALUE).all() and (cell(grid, 3, 2, h, w, 2) == PAD_VALUE).all()
    # n caps the number of pairs shown.
    assert pictures.recon_grid(x, x_hat, n=2, ncol=8, padding=2).size == (2 + 2 * 8, 2 + 2 * 8)
    with pytest.raises(ValueError, match="one shape"):
        pictures.recon_grid(x, x_hat[:, :1])


def test_recon_grid_of_grey_images_is_grey():
    h = w = 5
    x, p = quantised(4, 1, h, w, seed=10)
    x_hat, p_hat = quantised(4, 1, h, w, seed=11)
    img = pictures.recon_grid(x, x_hat, ncol=4, padding=1)
    assert img.mode == "L" and img.size == (1 + 4 * 6, 1 + 2 * 6)
    grid = np.asarray(img)
    for i in range(4):
        np.testing.assert_array_equal(cell(grid, 0, i, h, w, 1), p[i, ..., 0])
        np.testing.assert_array_equal(cell(grid, 1, i, h, w, 1), p_hat[i, ..., 0])


def test_atom_tiles_of_a_grey_dictionary_are_grey_and_normalised_per_atom():
    # The first-stage dictionary of a model with in_channels = 1: (M, 1, k, k).
    g = torch.Generator().manual_seed(12)
    weight = torch.randn(5, 1, 4, 4, generator=g) * torch.tensor([1e-3, 1.0, 20.0, 0.5, 2.0]).view(5, 1, 1, 1)
    zoom = 2
    img = pictures.atom_tiles(weight, zoom=zoom, padding=1)
    assert img.mode == "L" and img.size == (1 + 3 * 9, 1 + 2 * 9)  # ⌈√5⌉ = 3 per row, 8 px atoms
    grid = np.asarray(img)
    for m in range(5):
        a = weight[m, 0].double().numpy()
        expected = np.round(255 * (a - a.min()) / (a.max() - a.min())).astype(np.uint8)
        np.testing.assert_array_equal(cell(grid, m // 3, m % 3, 8, 8, 1), expected.repeat(zoom, 0).repeat(zoom, 1))


def test_atom_tiles_normalise_each_atom_to_the_full_range():
    g = torch.Generator().manual_seed(4)
    scales = torch.tensor([1e-3, 1.0, 50.0, 0.2, 3.0, 7.0]).view(6, 1, 1, 1)
    weight = torch.randn(6, 3, 4, 4, generator=g) * scales + torch.arange(6.0).view(6, 1, 1, 1)
    zoom, pad = 3, 1
    img = pictures.atom_tiles(weight, nrow=3, zoom=zoom, padding=pad)
    k = 4 * zoom
    assert img.mode == "RGB" and img.size == (pad + 3 * (k + pad), pad + 2 * (k + pad))
    grid = np.asarray(img)
    for m in range(6):
        t = cell(grid, m // 3, m % 3, k, k, pad)
        assert t.min() == 0 and t.max() == 255, m
        # Same picture as an independent min-max of that atom alone, enlarged by pixel repetition.
        a = weight[m].double().numpy()
        expected = np.round(255 * (a - a.min()) / (a.max() - a.min())).astype(np.uint8).transpose(1, 2, 0)
        np.testing.assert_array_equal(t, expected.repeat(zoom, 0).repeat(zoom, 1))


def test_atom_tiles_of_many_channel_atoms_are_grey():
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(9, 8, 3, 3, generator=g)
    weight[4] = 0.7  # a constant atom has no range: shown mid-grey
    img = pictures.atom_tiles(weight, zoom=1, padding=1)
    assert img.mode == "L" and img.size == (1 + 3 * 4, 1 + 3 * 4)  # ⌈√9⌉ = 3 per row
    grid = np.asarray(img)
    mean0 = weight[0].mean(0).numpy()
    expected = np.round(255 * (mean0 - mean0.min()) / (mean0.max() - mean0.min()))
    np.testing.assert_array_equal(cell(grid, 0, 0, 3, 3, 1), expected)
    assert (cell(grid, 1, 1, 3, 3, 1) == 128).all()
    first = np.asarray(pictures.atom_tiles(weight, zoom=1, padding=1, channels="first"))
    f0 = weight[0, 0].numpy()
    np.testing.assert_array_equal(cell(first, 0, 0, 3, 3, 1),
                                  np.round(255 * (f0 - f0.min()) / (f0.max() - f0.min())))


def test_decoded_atom_tiles_normalise_each_decoded_image():
    x = torch.stack([torch.linspace(a, b, 3 * 8 * 8).view(3, 8, 8) for a, b in [(-5, 5), (0.1, 0.2), (2, 3), (-1, 0)]])
    img = pictures.decoded_atom_tiles(x, padding=0)
    assert img.size == (16, 16)
    grid = np.asarray(img)
    for m in range(4):
        t = cell(grid, m // 2, m % 2, 8, 8, 0)
        assert t.min() == 0 and t.max() == 255


def test_code_activation_maps_show_where_codes_are_active():
    b, size = 3, 16
    image, _ = quantised(b, 3, size, size, seed=6)
    stage1 = torch.zeros(b, 8, 8, 8)
    stage1[:, :, 2, 5] = -3.0  # |z| counts: one hot position per image in stage 1
    stage2 = torch.rand(b, 16, 4, 4, generator=torch.Generator().manual_seed(7))
    img = pictures.code_activation_maps([stage1, stage2], image, n=2, padding=2)
    assert img.size == (2 + 3 * (size + 2), 2 + 2 * (size + 2))  # image + 2 maps per row, 2 rows
    grid = np.asarray(img)
    hot = np.round(np.array(matplotlib.colormaps["viridis"](1.0)[:3]) * 255)
    cold = np.round(np.array(matplotlib.colormaps["viridis"](0.0)[:3]) * 255)
    map1 = cell(grid, 0, 1, size, size, 2)
    # Stage 1 is 8×8 shown at 16×16: code position (2, 5) is the 2×2 block at rows 4–5, columns 10–11.
    assert (map1[4:6, 10:12] == hot).all()
    map1_rest = map1.copy()
    map1_rest[4:6, 10:12] = cold
    assert (map1_rest == cold).all()
    np.testing.assert_array_equal(cell(grid, 1, 0, size, size, 2), pictures.to_uint8(image)[1])
    with pytest.raises(ValueError, match="stage 2"):
        pictures.code_activation_maps([stage1, stage2[:1]], image)


def test_code_activation_maps_of_grey_images_are_rgb():
    image, _ = quantised(1, 1, 8, 8, seed=8)
    img = pictures.code_activation_maps([torch.rand(1, 4, 4, 4)], image, padding=0)
    assert img.mode == "RGB" and img.size == (16, 8)


def is_nontrivial_png(data: bytes) -> Image.Image:
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    img = Image.open(io.BytesIO(data))
    img.load()
    assert len(np.unique(np.asarray(img.convert("L")))) > 10  # axes, text and bars, not a blank canvas
    return img


def test_sparsity_histogram_renders_one_panel_per_stage():
    g = torch.Generator().manual_seed(9)
    usage = {"stage 1": torch.rand(64, generator=g), "stage 2": torch.rand(128, generator=g) * 0.2}
    img = pictures.sparsity_histogram(usage)
    assert img.mode == "RGB" and img.size == (800, 300)  # two 4×3-inch panels at 100 dpi
    is_nontrivial_png(pictures.png_bytes(img))
    three = pictures.sparsity_histogram([np.zeros(4), [0.5, 0.5], torch.ones(3)])
    assert three.size == (1200, 300)
    assert not np.array_equal(np.asarray(img), np.asarray(pictures.sparsity_histogram(
        {"stage 1": torch.ones(64), "stage 2": torch.zeros(128)})))


def test_curves_plot_renders_and_drops_non_finite_points():
    history = {"encoder/delta_r_z": [(0, 1.0), (10, 2.5), (20, 3.1)],
               "eval/psnr": [(0, 12.0), (10, float("inf")), (20, 18.5)],
               "decoder/objective": [(s, 1.0 / (1 + s)) for s in range(100)],
               "data/samples_per_s": [(0, 100.0)]}
    img = pictures.curves_plot(history)
    assert img.size == (1200, 600)  # 4 panels: 3 per row, 2 rows
    is_nontrivial_png(pictures.png_bytes(img))
    changed = dict(history, **{"encoder/delta_r_z": [(0, 3.0), (10, 0.5), (20, 1.0)]})
    assert not np.array_equal(np.asarray(img), np.asarray(pictures.curves_plot(changed)))
    with pytest.raises(ValueError, match="no curves"):
        pictures.curves_plot({})


def test_save_png_writes_a_readable_file(tmp_path):
    x, _p = quantised(4, 3, 5, 7, seed=10)
    img = pictures.image_grid(x, nrow=2)
    path = pictures.save_png(img, tmp_path / "nested" / "dir" / "grid.png")
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(img))
