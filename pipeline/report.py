"""A self-contained evaluation report: ``report.html`` + PNGs + ``metrics.json`` in one folder.

Pictures (docs/method.md §7): real-vs-reconstruction grid; the dictionary atoms of every encoder stage
(stage 1 in pixel space; deeper stages by decoding one-hot codes through the decoder); per-stage code
activation maps for a few images; per-stage histograms of atom usage (sparsity); ΔR / PSNR curves over
training from the MLflow history when it is available. Opens offline: no scripts, images side by side.
The plain-convolution baseline (model.layer=conv) gets the same pictures, captioned as filters and
feature maps (WORDS).
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.diagnostics import first_stage_weight
from pipeline.pictures import (atom_tiles, code_activation_maps, curves_plot, luminance, recon_grid, save_png,
                             sparsity_histogram)

REPORT_FILE = "report.html"
METRICS_FILE = "metrics.json"
ATOMS_SHOWN = 64  # atoms per stage in the tiles
ACTIVATION_IMAGES = 4  # images whose per-stage code maps are shown
WORDS = {"csc": {"title": "CSC-CTRL", "weights": "dictionary atoms", "unit": "atom", "code": "code"},
         "conv": {"title": "CTRL with plain convolutions", "weights": "filters", "unit": "channel",
                  "code": "feature map"}}
"""How the report names a stage's weights, its output channels and its output, per model.layer (the
conv baseline has no dictionary and no sparse code)."""


@torch.no_grad()
def decoded_atoms(encoder: nn.Module, decoder: nn.Module, stage: int, count: int = ATOMS_SHOWN) -> Tensor:
    """Images of the atoms of encoder stage ``stage`` (1-based, ≥ 2): a one-hot code at the centre of
    that stage's code map, pushed through the decoder stages that mirror the encoder below it, minus the
    decoder's response to the zero code (so the tile shows the atom's own contribution).

    The decoder's stage j input holds the code of encoder stage L − j + 1 (L = halving stages): see
    models/decoder.py for the mirror order."""
    decoder.eval()
    widths = [layer.weight.shape[0] for layer in encoder.csc_layers()]  # atoms per encoder stage
    halving = len(widths) - 1
    j = halving - (stage - 1)
    if not 1 <= stage <= halving or j < 1:
        raise ValueError(f"stage must be in [1, {halving}] for decoded atoms, got {stage}")
    m = min(count, widths[stage - 1])
    side = decoder.stages[j - 1].out_size
    device = next(decoder.parameters()).device
    h = torch.zeros(m + 1, widths[stage - 1], side, side, device=device)
    h[torch.arange(m), torch.arange(m), side // 2, side // 2] = 1.0  # last row stays the zero code
    for st in decoder.stages[j:]:
        h = st(h)
    return (h[:m] - h[m:]).float().cpu()


def write_report(out: Path, report: dict[str, Any], encoder: nn.Module, decoder: nn.Module, result: Any,
                 cfg: Any, history: dict[str, list[tuple[int, float]]] | None = None) -> Path:
    """Write the report folder; returns the path of report.html."""
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str]] = []

    def add(img: Any, name: str, caption: str) -> None:
        save_png(img, out / name)
        figures.append((name, caption))

    if result.example is not None:
        add(recon_grid(*result.example), "recon.png", "Real images (odd rows) and reconstructions g(f(x)) (even rows)")
    w = WORDS[cfg.model.layer]
    first = first_stage_weight(encoder).detach().float().cpu()[:ATOMS_SHOWN]
    add(atom_tiles(first), "atoms_stage1.png", f"Stage-1 {w['weights']} in pixel space")
    if first.shape[1] == 3:
        add(atom_tiles(luminance(first)), "atoms_stage1_luma.png",
            f"Stage-1 {w['weights']}, luminance only: their spatial structure without colour")
    halving = len(encoder.csc_layers()) - 1
    for stage in range(2, halving + 1):
        add(atom_tiles(decoded_atoms(encoder, decoder, stage)), f"atoms_stage{stage}.png",
            f"Stage-{stage} {w['unit']}s, decoded from one-hot {w['code']}s through the decoder")
    if result.example is not None:
        x = result.example[0][:ACTIVATION_IMAGES].to(next(encoder.parameters()).device)
        with torch.no_grad():
            _, codes = encoder.forward_with_codes(x)
        add(code_activation_maps([c.float().cpu() for c in codes[:-1]], x.cpu()), "code_maps.png",
            f"Per-stage {w['code']} activity (mean |{w['code']}| over {w['unit']}s) for a few images")
    if result.sparsity_per_atom:
        add(sparsity_histogram({f"stage {i + 1}": u.numpy() for i, u in enumerate(result.sparsity_per_atom)}),
            "sparsity_hist.png", f"Fraction of non-zero {w['code']} entries per {w['unit']}, per stage")
    if history:
        add(curves_plot(history), "curves.png", "Training curves from the MLflow history")
    (out / METRICS_FILE).write_text(json.dumps(report, indent=2))
    path = out / REPORT_FILE
    path.write_text(_html(report, figures, cfg))
    return path


def _html(report: dict[str, Any], figures: list[tuple[str, str]], cfg: Any) -> str:
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.6g}</td></tr>" if isinstance(v, float)
                   else f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in report["metrics"].items())
    figs = "".join(f'<figure><img src="{name}" alt="{html.escape(cap)}"><figcaption>{html.escape(cap)}'
                   f"</figcaption></figure>" for name, cap in figures)
    meta = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(report[k]))}</li>"
                   for k in ("model", "layer", "trained_on", "evaluated_on", "generalisation"))
    title = WORDS[cfg.model.layer]["title"]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title} evaluation: {html.escape(cfg.run.name)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td{{border:1px solid #ccc;padding:2px 8px}}figure{{display:inline-block;margin:8px;vertical-align:top}}
img{{max-width:520px;image-rendering:pixelated}}</style></head>
<body><h1>{title} evaluation: {html.escape(cfg.run.name)}</h1><ul>{meta}</ul>
<h2>Metrics</h2><table>{rows}</table><h2>Pictures</h2>{figs}</body></html>
"""
