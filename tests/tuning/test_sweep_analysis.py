"""After a sweep: rows from real Tune Trial objects, the best trial, the Pareto front (against a brute-force
check), the CSV table, the trade-off PNG, and a best-config file that `cscctrl train -c` accepts."""
from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
from PIL import Image
from ray.tune.experiment import Trial

from pipeline.config import load_config
from tuning import analysis
from tuning.analysis import LAST_CHECKPOINT_KEY, format_value, nonzero_fraction, render_table
from tuning.callbacks import TrialTable, complete_report
from tuning.spaces import parse_space, to_param_space

DEBUG = {"model.preset": "csc_ctrl_debug", "train.steps": 40}
LAM = "model.lam"
SPACE = {"model.lam": {"grid": [0.0, 0.1, 0.5]}, "model.n_steps": {"grid": [1, 3]}}


def make_trial(trial_id: str, config: dict, status: str, result: dict | None) -> Trial:
    t = Trial("__fake", config=config, trial_id=trial_id, stub=True)
    if result is not None:
        t.update_last_result(result)
    t.set_status(status)
    return t


def report(step: int, psnr: float, nz: tuple[float, ...], **extra) -> dict:
    out = {"train/step": step, "train/recon_psnr": psnr - 1.0, "eval/psnr": psnr, **extra}
    out.update({f"eval/sparsity/stage{i + 1}": v for i, v in enumerate(nz)})
    out.update({f"sparsity/stage{i + 1}": v + 0.5 for i, v in enumerate(nz)})
    return out


@pytest.fixture
def rows():
    base = load_config(None, DEBUG)
    dims = parse_space(SPACE, base)
    trials = [
        make_trial("t_00000", {LAM: 0.0, "model.n_steps": 1}, Trial.TERMINATED,
                   report(40, 20.0, (0.9, 0.8), **{LAST_CHECKPOINT_KEY: "/ckpt/a"})),
        make_trial("t_00001", {LAM: 0.1, "model.n_steps": 1}, Trial.TERMINATED, report(40, 18.0, (0.3, 0.2))),
        make_trial("t_00002", {LAM: 0.5, "model.n_steps": 1}, Trial.TERMINATED, report(40, 12.0, (0.05, 0.05))),
        make_trial("t_00003", {LAM: 0.0, "model.n_steps": 3}, Trial.TERMINATED,      # stopped by ASHA
                   {"train/step": 10, "train/recon_psnr": 25.0, "eval/psnr": math.nan, "sparsity/stage1": 0.9}),
        make_trial("t_00004", {LAM: 0.1, "model.n_steps": 3}, Trial.TERMINATED, report(40, 17.0, (0.4, 0.4))),
        make_trial("t_00005", {LAM: 0.5, "model.n_steps": 3}, Trial.PENDING, None),
    ]
    return analysis.rows_from_trials(trials, dims, 40, lambda tid: f"sw-{tid}"), dims, base


def test_rows_from_real_trial_objects(rows):
    rows, _, _ = rows
    assert [r.status for r in rows] == ["done", "done", "done", "stopped", "done", "pending"]
    assert rows[0].point == {"model.lam": 0.0, "model.n_steps": 1}
    assert rows[2].searched == {"model.lam": 0.5, "model.n_steps": 1}
    assert rows[0].run_name == "sw-t_00000" and rows[0].checkpoint == "/ckpt/a"
    assert rows[0].nonzero == pytest.approx(0.85)            # held-out sparsity preferred
    assert rows[3].nonzero == pytest.approx(0.9)             # training sparsity when no evaluation
    assert math.isnan(rows[5].value("eval/psnr"))


def test_a_trial_with_its_own_step_count_is_done_at_its_last_step():
    base = load_config(None, DEBUG)
    dims = parse_space({"train.steps": {"grid": [10, 40]}}, base)
    trials = [make_trial("t_00000", {"train.steps": 10}, Trial.TERMINATED, report(10, 15.0, (0.5,))),
              make_trial("t_00001", {"train.steps": 40}, Trial.TERMINATED, report(10, 15.0, (0.5,)))]
    rows = analysis.rows_from_trials(trials, dims, base.train.steps, str)
    assert [r.status for r in rows] == ["done", "stopped"]


def test_best_ignores_nan_stopped_and_pending(rows):
    rows, _, _ = rows
    assert analysis.best_row(rows, "eval/psnr", "max").trial_id == "t_00000"
    assert analysis.best_row(rows, "eval/psnr", "min").trial_id == "t_00002"
    # the stopped trial has the highest training PSNR but did not finish: not eligible
    assert analysis.best_row(rows, "train/recon_psnr", "max").trial_id == "t_00000"
    assert analysis.best_row(rows[3:4], "eval/psnr", "max") is None


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(0)
    base = load_config(None, DEBUG)
    dims = parse_space({"model.lam": {"uniform": [0.0, 1.0]}}, base)
    metric, nz = rng.normal(20, 3, 40).round(1), rng.uniform(0, 1, 40).round(2)   # rounding makes ties
    trials = [make_trial(f"t_{i:05d}", {LAM: 0.1}, Trial.TERMINATED, report(40, float(m), (float(z),)))
              for i, (m, z) in enumerate(zip(metric, nz))]
    rows = analysis.rows_from_trials(trials, dims, 40, str)
    for mode, sign in (("max", 1), ("min", -1)):
        expected = set()
        for i in range(40):
            dominated = any(sign * metric[j] >= sign * metric[i] and nz[j] <= nz[i]
                            and (sign * metric[j] > sign * metric[i] or nz[j] < nz[i]) for j in range(40))
            if not dominated:
                expected.add(f"t_{i:05d}")
        assert {r.trial_id for r in analysis.pareto_front(rows, "eval/psnr", mode)} == expected


def test_table_csv(rows):
    rows, dims, _ = rows
    records = analysis.table_records(rows, dims, "eval/psnr", "max")
    parsed = list(csv.DictReader(io.StringIO(analysis.records_csv(records))))
    assert len(parsed) == 6
    first = parsed[0]
    assert first["trial_id"] == "t_00000" and first["status"] == "done" and first[LAM] == "0.0"
    assert float(first["eval/psnr"]) == 20.0 and float(first["eval/sparsity/stage2"]) == 0.8
    assert [p["pareto"] for p in parsed] == ["True", "True", "True", "False", "False", "False"]
    assert parsed[3]["eval/psnr"] == ""                       # NaN is an empty cell, not "nan"
    table = json.loads(analysis.records_json(records))
    assert table["columns"] == list(records[0]) and len(table["data"]) == 6
    assert table["data"][2][0] == "t_00002" and table["data"][3][table["columns"].index("eval/psnr")] is None


def test_plot_is_a_png_of_the_trade_off(rows, tmp_path):
    rows, _, base = rows
    path = analysis.plot_tradeoff(rows, "eval/psnr", "max", base, tmp_path / analysis.PLOT_FILE)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        assert im.size == (1210, 462) and len(np.unique(np.asarray(im.convert("L")))) > 10   # drawn, not blank
    empty = analysis.plot_tradeoff([], "eval/psnr", "max", base, tmp_path / "empty.png")
    assert empty.exists()


def test_best_config_file_is_accepted_by_cscctrl_train(rows, tmp_path, capsys):
    rows, _, _ = rows
    best = analysis.best_row(rows, "eval/psnr", "max")
    best.point["model.lam"] = 0.05                              # a value the base does not have
    text = analysis.best_config_yaml("", {**DEBUG, "train.eval_batches": 2}, best.point, header="best of sweep\nline 2")
    assert text.startswith("# best of sweep\n# line 2\n")
    f = tmp_path / analysis.BEST_CONFIG_FILE
    f.write_text(text)
    cfg = load_config(f)
    assert cfg.model.lam == 0.05 and cfg.model.n_steps == 1 and cfg.model.ndf == 8   # preset kept
    assert cfg.train.steps == 40 and cfg.train.eval_batches == 2
    assert cfg.run.name == "" and cfg.tracking.parent_run_id == ""
    # a swept value equal to the default but not to the preset's (ndf 64 vs csc_ctrl_debug's 8) is kept
    f.write_text(analysis.best_config_yaml("", DEBUG, {**best.point, "model.ndf": 64}))
    assert load_config(f).model.ndf == 64
    from pipeline.cli import main

    assert main(["train", "-c", str(f), "--print-config"]) == 0
    assert "lam: 0.05" in capsys.readouterr().out


def test_summary_text(rows):
    rows, _, _ = rows
    best = analysis.best_row(rows, "eval/psnr", "max")
    text = analysis.summary_text(rows, best, "eval/psnr", "sw", parent_run_id="abc", tracking_uri="sqlite:///x",
                                 best_config_path="/s/best_config.yaml", complete=False)
    assert "best trial t_00000 (λ=0, n=1): eval/psnr = 20.0000" in text
    assert "checkpoint /ckpt/a" in text and "cscctrl train -c /s/best_config.yaml" in text
    assert "incomplete" in text and "4 done, 1 pending, 1 stopped" in text


def test_complete_report_carries_ranked_keys():
    prev: dict = {}
    first = complete_report({"train/step": 5.0, "train/recon_psnr": 9.0}, ("eval/psnr", "train/recon_psnr"), prev)
    assert math.isnan(first["eval/psnr"]) and first["train/recon_psnr"] == 9.0
    empty = complete_report({}, ("train/recon_psnr",), {"train/recon_psnr": 9.0})        # checkpoint-only report
    assert empty == {"train/recon_psnr": 9.0}
    final = complete_report({"eval/psnr": 21.0}, ("eval/psnr",), {"eval/psnr": math.nan})
    assert final["eval/psnr"] == 21.0


def test_live_table_from_real_trials(rows):
    _, dims, _ = rows
    trials = [make_trial("t_00000", {LAM: 0.1, "model.n_steps": 3}, Trial.RUNNING,
                         {"train/step": 10, "eval/psnr": math.nan, "sparsity/stage1": 0.25, "sparsity/stage2": 0.75}),
              make_trial("t_00001", {LAM: 0.0, "model.n_steps": 1}, Trial.ERROR, None)]
    text = TrialTable(dims, "eval/psnr", 40).table(trials)
    lines = text.splitlines()
    assert lines[0].split() == ["trial", "status", "λ", "n", "step", "eval/psnr", "nonzero"]
    assert lines[1].split() == ["t_00000", "running", "0.1", "3", "10", "-", "0.5"]
    assert lines[2].split() == ["t_00001", "error", "0", "1", "-", "-", "-"]
    assert len({len(line) for line in lines}) == 1                                   # aligned columns
    assert to_param_space(dims, "grid")                                              # same dims drive Tune


def test_formatting_helpers():
    assert format_value(0.000123456) == "0.0001235" and format_value((0.1, 0.0)) == "(0.1,0)"
    assert format_value(True) == "true" and format_value(math.nan) == "-"
    assert math.isnan(nonzero_fraction({"train/step": 3}))
    assert render_table([["a", "1"]], ["name", "value"]).splitlines()[1] == "a         1"
