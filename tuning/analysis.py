"""After a sweep: one row per trial, the best trial, the trade-off plot, the best config as a train file.

The ranking metric (default ``eval/psnr``: PSNR of g(f(x)) on the exact, non-resampled evaluation
split) is read from each trial's last report, beside the fraction of non-zero codes per CSC stage
(held-out when measured). A trial is on the Pareto front when no other finished trial is at least as
good on both — metric (by ``mode``) and non-zero fraction (lower = sparser) — and strictly better on one;
that front is the menu of reconstruction-versus-sparsity trade-offs.

Everything here works on ``TrialRow`` lists, so it is testable without Ray; ``rows_from_trials`` is the
only function that reads Tune's objects.
"""
from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import ExperimentConfig, diff_from_defaults, load_config
from pipeline.metric_names import STEP
from tuning.spaces import Dimension, decode_trial, overrides_from_trial

LAST_CHECKPOINT_KEY = "sweep/last_checkpoint"  # report key: path of the newest checkpoint of a trial's run
PLOT_FILE = "metric_vs_lam_n.png"
TABLE_FILE = "trials.csv"
TABLE_JSON_FILE = "trials.json"
BEST_CONFIG_FILE = "best_config.yaml"


# ----------------------------------------------------------------------------------------------
# What a trial shows: labels, values, status (shared with the live table)
# ----------------------------------------------------------------------------------------------


def short_label(key: str) -> str:
    """Column label of a swept key: λ and n as in the paper, else the key without its section."""
    if key == "model.lam":
        return "λ"
    if key.startswith("model.lam_per_stage:"):
        return f"λ{key.rsplit(':', 1)[1]}"
    if key == "model.n_steps":
        return "n"
    return key.split(".", 1)[1]


def format_value(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v).lower()
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, (tuple, list)):
        return "(" + ",".join(format_value(x) for x in v) + ")"
    return str(v)


def nonzero_fraction(result: dict[str, Any]) -> float:
    """Mean over CSC stages of the fraction of non-zero codes: held-out if measured, else training."""
    for prefix in ("eval/sparsity/stage", "sparsity/stage"):
        values = [v for k, v in result.items() if k.startswith(prefix) and isinstance(v, (int, float))
                  and not math.isnan(v)]
        if values:
            return sum(values) / len(values)
    return math.nan


def render_table(rows: list[list[str]], header: list[str]) -> str:
    """Columns padded to their widest cell; the first left-aligned, the rest right-aligned."""
    widths = [max([len(header[i])] + [len(r[i]) for r in rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), *(line(r) for r in rows)])


def trial_status(status: str, step: float, total_steps: int) -> str:
    """Tune's status in the words of a sweep: a TERMINATED trial that stopped before the last step was
    stopped early by the scheduler."""
    if status == "TERMINATED":
        return "stopped" if (not math.isnan(step) and step < total_steps) else "done"
    return {"RUNNING": "running", "PENDING": "pending", "PAUSED": "paused", "ERROR": "error"}.get(status, status.lower())


# ----------------------------------------------------------------------------------------------
# Rows, best trial, Pareto front
# ----------------------------------------------------------------------------------------------


@dataclass
class TrialRow:
    trial_id: str
    run_name: str
    status: str                     # done | stopped | error | running | pending
    point: dict[str, Any]           # {dotted config path: value} this trial applied
    searched: dict[str, Any] = field(default_factory=dict)   # {dimension key: drawn value}
    metrics: dict[str, float] = field(default_factory=dict)  # its last report (numbers only)
    error: str = ""
    checkpoint: str = ""

    @property
    def step(self) -> float:
        return float(self.metrics.get(STEP, math.nan))

    def value(self, metric: str) -> float:
        return float(self.metrics.get(metric, math.nan))

    @property
    def nonzero(self) -> float:
        return nonzero_fraction(self.metrics)


def rows_from_trials(trials: Sequence[Any], dims: Sequence[Dimension], total_steps: int,
                     run_name_of: Any) -> list[TrialRow]:
    """Tune ``Trial`` objects (``tune.ExperimentAnalysis(path).trials``) -> rows, in creation order.
    ``total_steps`` is the base config's train.steps (a trial that sweeps train.steps uses its own)."""
    rows = []
    for t in sorted(trials, key=lambda t: t.trial_id):  # ids end in the creation index
        result = t.last_result or {}
        metrics = {k: float(v) for k, v in result.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        try:
            searched, point = decode_trial(t.config, dims), overrides_from_trial(t.config, dims)
        except ValueError:
            searched, point = {}, {}
        error = ""
        if t.status == "ERROR":
            err = t.get_error()
            error = _last_line(str(err)) if err is not None else "error"
        rows.append(TrialRow(trial_id=t.trial_id, run_name=run_name_of(t.trial_id),
                             status=trial_status(t.status, metrics.get(STEP, math.nan),
                                                 int(point.get("train.steps", total_steps))),
                             point=point, searched=searched, metrics=metrics, error=error,
                             checkpoint=str(result.get(LAST_CHECKPOINT_KEY, ""))))
    return rows


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else text


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def best_row(rows: Sequence[TrialRow], metric: str, mode: str) -> TrialRow | None:
    """The finished trial with the best finite ``metric`` (ties: the earlier trial)."""
    best = None
    for r in rows:
        v = r.value(metric)
        if r.status == "done" and math.isfinite(v) and (best is None or _better(v, best.value(metric), mode)):
            best = r
    return best


def pareto_front(rows: Sequence[TrialRow], metric: str, mode: str) -> list[TrialRow]:
    """Finished trials not dominated on (metric by ``mode``, non-zero fraction lower-is-sparser)."""
    done = [r for r in rows if r.status == "done" and math.isfinite(r.value(metric)) and math.isfinite(r.nonzero)]

    def dominates(a: TrialRow, b: TrialRow) -> bool:
        ma, mb = a.value(metric), b.value(metric)
        at_least = (ma >= mb if mode == "max" else ma <= mb) and a.nonzero <= b.nonzero
        strictly = _better(ma, mb, mode) or a.nonzero < b.nonzero
        return at_least and strictly

    return [r for r in done if not any(dominates(o, r) for o in done if o is not r)]


# ----------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------


def stage_keys(rows: Sequence[TrialRow]) -> list[str]:
    """The per-stage sparsity keys present in any row (held-out ones first)."""
    keys = sorted({k for r in rows for k in r.metrics if k.startswith(("eval/sparsity/stage", "sparsity/stage"))},
                  key=lambda k: (not k.startswith("eval/"), int(k.rsplit("stage", 1)[1])))
    return keys


def table_records(rows: Sequence[TrialRow], dims: Sequence[Dimension], metric: str, mode: str) -> list[dict[str, Any]]:
    """One flat record per trial: ids, status, searched values (one column per dimension), metric,
    per-stage sparsity, Pareto flag."""
    front = {r.trial_id for r in pareto_front(rows, metric, mode)}
    extra = [k for k in ("eval/psnr", "eval/ssim", "train/recon_psnr") if k != metric]
    records = []
    for r in rows:
        rec: dict[str, Any] = {"trial_id": r.trial_id, "run_name": r.run_name, "status": r.status}
        for d in dims:
            v = r.searched.get(d.key)
            rec[d.key] = list(v) if isinstance(v, tuple) else v
        rec["step"] = None if math.isnan(r.step) else int(r.step)
        rec[metric] = _num(r.value(metric))
        for k in extra:
            rec[k] = _num(r.value(k))
        for k in stage_keys(rows):
            rec[k] = _num(r.value(k))
        rec["nonzero_mean"] = _num(r.nonzero)
        rec["pareto"] = r.trial_id in front
        rec["checkpoint"] = r.checkpoint
        rec["error"] = r.error
        records.append(rec)
    return records


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None


def records_csv(records: Sequence[Mapping[str, Any]]) -> str:
    if not records:
        return ""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
    writer.writeheader()
    for rec in records:
        writer.writerow({k: ("" if v is None else v) for k, v in rec.items()})
    return buf.getvalue()


def records_json(records: Sequence[Mapping[str, Any]]) -> str:
    """The table as {"columns": [...], "data": [[...], ...]} (pandas' "split" layout, which MLflow's
    table artifacts use). Written whole each time: ``MlflowClient.log_table`` would append the rows of a
    resumed sweep to those of its interrupted summary."""
    columns = list(records[0]) if records else []
    return json.dumps({"columns": columns, "data": [[rec[k] for k in columns] for rec in records]}, indent=1)


# ----------------------------------------------------------------------------------------------
# Plot: the metric against λ and n, and against the non-zero fraction
# ----------------------------------------------------------------------------------------------


def effective_lam(row: TrialRow, base: ExperimentConfig) -> float:
    """λ of a trial: its model.lam, or the largest of its per-stage λ when it has them."""
    lams = row.point.get("model.lam_per_stage", base.model.lam_per_stage)
    if lams:
        return float(max(lams))
    return float(row.point.get("model.lam", base.model.lam))


def unroll_steps(row: TrialRow, base: ExperimentConfig) -> int:
    return int(row.point.get("model.n_steps", base.model.n_steps))


def plot_tradeoff(rows: Sequence[TrialRow], metric: str, mode: str, base: ExperimentConfig, path: Path) -> Path:
    """Two panels, PNG: the metric against λ (symlog axis: λ = 0 is a swept value) with one series per
    unroll depth n; and the metric against the non-zero fraction of the codes, Pareto front joined."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = [r for r in rows if r.status in ("done", "stopped") and math.isfinite(r.value(metric))]
    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax_lam, ax_nz = fig.subplots(1, 2)
    for n in sorted({unroll_steps(r, base) for r in done}):
        series = sorted((effective_lam(r, base), r.value(metric), r.status) for r in done if unroll_steps(r, base) == n)
        xs, ys = [s[0] for s in series], [s[1] for s in series]
        line, = ax_lam.plot(xs, ys, marker="o", label=f"n = {n}")
        stopped = [(x, y) for x, y, st in series if st == "stopped"]
        if stopped:  # early-stopped trials: their metric is from an earlier step
            ax_lam.scatter(*zip(*stopped), facecolors="white", edgecolors=line.get_color(), zorder=3)
    ax_lam.set_xscale("symlog", linthresh=0.01)
    ax_lam.set_xlabel("λ (largest stage λ when per-stage)")
    ax_lam.set_ylabel(metric)
    ax_lam.set_title(f"{metric} against λ and unroll steps n")
    if done:
        ax_lam.legend(loc="best", fontsize=8)
    ax_lam.grid(alpha=0.3)

    pts = [(r.nonzero, r.value(metric)) for r in done if math.isfinite(r.nonzero)]
    if pts:
        ax_nz.scatter(*zip(*pts), color="tab:gray", label="trials")
    front = sorted((r.nonzero, r.value(metric)) for r in pareto_front(rows, metric, mode))
    if front:
        ax_nz.plot(*zip(*front), color="tab:red", marker="o", label="Pareto front")
    ax_nz.set_xlabel("fraction of non-zero codes (mean over stages; lower = sparser)")
    ax_nz.set_ylabel(metric)
    ax_nz.set_title("reconstruction against sparsity")
    if pts:
        ax_nz.legend(loc="best", fontsize=8)
    ax_nz.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# ----------------------------------------------------------------------------------------------
# The best configuration as a file `cscctrl train -c` accepts
# ----------------------------------------------------------------------------------------------


def best_config_yaml(config_file: str, base_overrides: Mapping[str, Any], point: Mapping[str, Any],
                     header: str = "") -> str:
    """The experiment file of the best trial: the sweep's config file + its base overrides + the trial's
    values, resolved through ``load_config`` and written as the sections that differ from the defaults.
    Run name, MLflow parent and per-trial resources are left out: the file starts a new, full run."""
    cfg = load_config(config_file or None, {**base_overrides, **point})
    tree = diff_from_defaults(cfg)
    # Keys the sweep set are written even when they equal the defaults: a preset may hold other values.
    full = cfg.to_dict()
    for key in [*base_overrides, *point]:
        *sections, leaf = key.split(".")
        src, dst = full, tree
        for part in sections:
            src, dst = src[part], dst.setdefault(part, {})
        dst[leaf] = src[leaf]
    tree.get("run", {}).pop("name", None)
    tree.get("tracking", {}).pop("parent_run_id", None)
    tree.pop("scaling", None)
    tree = {k: v for k, v in tree.items() if v}
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    return comment + yaml.safe_dump(tree, sort_keys=False)


# ----------------------------------------------------------------------------------------------
# Terminal summary
# ----------------------------------------------------------------------------------------------


def summary_text(rows: Sequence[TrialRow], best: TrialRow | None, metric: str, sweep: str, *,
                 parent_run_id: str, tracking_uri: str, best_config_path: str, complete: bool) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    lines = [f"[cscctrl] sweep {sweep}: {len(rows)} trial(s): "
             + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    if not complete:
        lines.append("[cscctrl] the sweep is incomplete (interrupted); run the same command again to resume it")
    if best is None:
        lines.append(f"[cscctrl] no finished trial reported a finite {metric}")
    else:
        values = ", ".join(f"{short_label(k)}={format_value(v)}" for k, v in best.searched.items())
        lines.append(f"[cscctrl] best trial {best.trial_id} ({values}): {metric} = {best.value(metric):.4f}, "
                     f"non-zero codes {format_value(best.nonzero)}")
        lines.append(f"[cscctrl]   run {best.run_name}; checkpoint {best.checkpoint or '-'}")
        lines.append(f"[cscctrl]   best config: {best_config_path}  (cscctrl train -c {best_config_path})")
    for r in rows:
        if r.status == "error":
            lines.append(f"[cscctrl] trial {r.trial_id} failed: {r.error}")
    lines.append(f"[cscctrl] MLflow parent run {parent_run_id} at {tracking_uri}")
    return "\n".join(lines)
