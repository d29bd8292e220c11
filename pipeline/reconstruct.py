"""`cscctrl reconstruct MODEL IMAGES OUT_DIR`: reconstructions g(f(x)) of a folder of images (or one image).

Each image, of any size, is prepared as training prepared its shards (pipeline/image_files.py: the centre
square crop resized to the model's resolution S, grey or RGB as the model was trained), then reconstructed.
OUT_DIR receives, for an image whose path relative to IMAGES is KEY (NAME = KEY, with ".png" appended
unless KEY ends in .png):

    reconstructions/NAME     the reconstruction, S × S pixels (8-bit grey or RGB: p = round(255 (x̂ + 1) / 2))
    pairs/NAME               the prepared input (left) beside its reconstruction (right), enlarged --zoom times
    grid.png                 the first --grid prepared inputs, each row of them above its reconstructions
    reconstructions.csv      key, file, psnr_db: the PSNR of the reconstruction against the prepared input
                             (images in [-1, 1], peak-to-peak 2: 10 log10(4 / MSE))
    refused.csv              path, reason: the files that could not be read (only when there are some)

OUT_DIR must be empty or new unless --overwrite (which replaces files of the same name and leaves others).
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pipeline import metrics as M
from pipeline.applied_model import MODEL_HELP, add_model_options, load_applied_model, pick_device
from pipeline.encode import write_refused
from pipeline.image_files import image_batches, list_images
from pipeline.pictures import recon_grid, save_png, tile, to_uint8

HELP_EPILOG = """\
examples:
  cscctrl reconstruct models:/csc-ctrl-demo@candidate ~/Pictures/garments recon/ \\
      --tracking-uri sqlite:///$PWD/runs/demo/mlflow.db
  cscctrl reconstruct runs/ctrl-32px-multiclass-0123456789 photo.jpg recon/

OUT_DIR gets reconstructions/, pairs/ (input | reconstruction), grid.png and reconstructions.csv (PSNR).
"""

PAIR_MIN_SIDE = 128  # --zoom auto enlarges pairs until each image is at least this many pixels wide


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = HELP_EPILOG
    p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    p.add_argument("images", metavar="IMAGES", help="a folder of images (searched recursively; any size and "
                                                    "format Pillow reads) or one image file")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for the reconstructions, pairs, grid and PSNR table")
    p.add_argument("--zoom", type=int, default=0,
                   help=f"enlarge the pair images this many times, by pixel repetition (default 0 = auto: until "
                        f"an image is at least {PAIR_MIN_SIDE} px wide)")
    p.add_argument("--grid", type=int, default=64, help="images in grid.png (default 64; 0 = no grid)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes decoding images beside the model (default 0 = decode in this process)")
    add_model_options(p)
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty OUT_DIR, replacing files of the same name (default: refuse)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def output_name(key: str) -> str:
    """KEY with '.png' appended unless it ends in .png (so 'a.jpg' and 'a.png' stay two files)."""
    return key if key.lower().endswith(".png") else f"{key}.png"


def check_out_dir(out_dir: str, overwrite: bool) -> Path:
    path = Path(out_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(20, "OUT_DIR is a file", str(path))
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"OUT_DIR {path} is not empty: pass --overwrite to write into it (files of the same name "
                         f"are replaced), or choose another folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def main(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.zoom < 0 or args.grid < 0 or args.workers < 0:
        raise ValueError(f"--batch-size {args.batch_size} must be >= 1; --zoom {args.zoom}, --grid {args.grid} and "
                         f"--workers {args.workers} >= 0")
    files, refused = list_images(args.images)
    if not files:
        raise ValueError(f"IMAGES {args.images}: no image files in it ({len(refused)} unreadable entries)")
    out = check_out_dir(args.out_dir, args.overwrite)
    model = load_applied_model(args.model, device=pick_device(args.device), tracking_uri=args.tracking_uri)
    zoom = args.zoom or max(1, math.ceil(PAIR_MIN_SIDE / model.image_size))
    print(f"[cscctrl] reconstructing {len(files)} image(s) under {args.images} with {model.description} on "
          f"{model.device}", file=sys.stderr, flush=True)
    table: list[tuple[str, str, str]] = []
    grid_x: list[torch.Tensor] = []
    grid_hat: list[torch.Tensor] = []
    with tqdm(total=len(files), unit="img", desc="reconstruct", disable=args.no_progress, dynamic_ncols=True) as bar:
        for x, rows, bad in image_batches(files, model.image_size, model.in_channels, args.batch_size, args.workers):
            refused.extend((files[i].key, why) for i, why in bad)
            bar.update(len(rows) + len(bad))
            if x is None:
                continue
            x_hat = model.reconstruct(x).cpu()
            psnr = M.psnr(x, x_hat, reduction="none").tolist()
            inputs, recons = to_uint8(x), to_uint8(x_hat)
            for j, i in enumerate(rows):
                name = output_name(files[i].key)
                save_png(tile([recons[j]], 1, padding=0), out / "reconstructions" / name)
                pair = [t.repeat(zoom, 0).repeat(zoom, 1) for t in (inputs[j], recons[j])]
                save_png(tile(pair, 2, padding=2 * zoom), out / "pairs" / name)
                table.append((files[i].key, name, f"{psnr[j]:.4f}"))
            if len(grid_x) * args.batch_size < args.grid:
                grid_x.append(x)
                grid_hat.append(x_hat)
    if table and args.grid:
        save_png(recon_grid(torch.cat(grid_x)[:args.grid], torch.cat(grid_hat)[:args.grid]), out / "grid.png")
    with (out / "reconstructions.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("key", "file", "psnr_db"), *table])
    if refused:
        write_refused(out / "refused.csv", refused)
        print(f"[cscctrl] {len(refused)} file(s) could not be read; they and the reasons are listed in "
              f"{out / 'refused.csv'}", file=sys.stderr)
    if not table:
        raise ValueError(f"IMAGES {args.images}: none of the {len(files)} image file(s) could be read (see "
                         f"{out / 'refused.csv'})")
    mean = sum(float(r[2]) for r in table) / len(table)
    print(f"[cscctrl] wrote {len(table)} reconstruction(s) to {out} (mean PSNR {mean:.2f} dB against the prepared "
          f"inputs)", flush=True)
    return 0
