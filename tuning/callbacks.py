"""The two callbacks of a sweep: Ray Train -> Tune reports, and the live trial table in the terminal.

``SweepReportCallback`` runs in each trial's Ray Train controller and forwards rank 0's reports to Tune
(as Ray's ``TuneReportCallback``), making sure every report carries the keys Tune ranks on: Tune
rejects a result without its metric, and the held-out metric exists only in the last report. A key a
report lacks gets the value it had in the previous report, or NaN before it was ever measured; NaN is
never a best value and ASHA ignores it.

``TrialTable`` is a Tune callback that prints one compact table of all trials (status, the swept
values, step, metric, non-zero fraction of the codes) whenever a trial changes status, and at most every
``refresh_s`` seconds while results arrive. It is pickled with the experiment state (resume), so it holds
only plain data and looks up ``sys.stdout`` when it prints.

``SealState`` seals Tune's state each time Tune saves it (tuning/state_seal.py), so that a resume can
refuse state this project did not write.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from pipeline.metric_names import STEP
from tuning.analysis import (LAST_CHECKPOINT_KEY, format_value, nonzero_fraction, render_table, short_label,
                             trial_status)
from tuning.spaces import Dimension, decode_trial
from tuning.state_seal import StateSealer

log = logging.getLogger(__name__)

REFRESH_S = 30.0  # seconds between tables while only results (no status changes) arrive


class SweepReportCallback(TuneReportCallback):
    """Forward Train reports to Tune with every key in ``carry`` present (previous value, else NaN)."""

    def __init__(self, carry: Sequence[str]) -> None:
        super().__init__()
        self.carry = tuple(carry)
        self.previous: dict[str, float] = {}
        self.last_checkpoint = ""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        first = complete_report(metrics[0] if metrics else {}, self.carry, self.previous)
        self.previous = {k: first[k] for k in self.carry}
        if checkpoint is not None:
            self.last_checkpoint = checkpoint.path
        if self.last_checkpoint:  # the final (evaluation) report has no checkpoint of its own
            first[LAST_CHECKPOINT_KEY] = self.last_checkpoint
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def complete_report(report: dict[str, Any], carry: Sequence[str], previous: dict[str, float]) -> dict[str, Any]:
    """A copy of ``report`` in which each key of ``carry`` is present: its own value, else the previous
    report's, else NaN."""
    out = dict(report)
    for key in carry:
        if key not in out:
            out[key] = previous.get(key, math.nan)
    return out


# ----------------------------------------------------------------------------------------------
# The live table
# ----------------------------------------------------------------------------------------------


class TrialTable(Callback):
    """Prints the sweep's trial table on status changes, and every ``refresh_s`` seconds on results.
    ``total_steps`` is the base config's train.steps (a trial that sweeps train.steps uses its own)."""

    def __init__(self, dims: Sequence[Dimension], metric: str, total_steps: int, refresh_s: float = REFRESH_S) -> None:
        self.dims = list(dims)
        self.metric = metric
        self.total_steps = total_steps
        self.refresh_s = refresh_s
        self._last_print = 0.0
        self._statuses: dict[str, str] = {}

    def table(self, trials: Sequence[Any]) -> str:
        keys = [d.key for d in self.dims]
        header = ["trial", "status", *(short_label(k) for k in keys), "step", self.metric, "nonzero"]
        rows = []
        for t in trials:
            result = t.last_result or {}
            step = float(result.get(STEP, math.nan))
            try:
                searched = decode_trial(t.config, self.dims)
            except ValueError:
                searched = {}
            values = [format_value(searched.get(k)) for k in keys]
            total = int(searched.get("train.steps", self.total_steps))
            rows.append([t.trial_id, trial_status(t.status, step, total), *values,
                         format_value(step if math.isnan(step) else int(step)),
                         format_value(float(result.get(self.metric, math.nan))),
                         format_value(nonzero_fraction(result))])
        return render_table(rows, header)

    def _print(self, trials: Sequence[Any]) -> None:
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        summary = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        sys.stdout.write(f"\n[cscctrl] {time.strftime('%H:%M:%S')} trials: {summary}\n{self.table(trials)}\n")
        sys.stdout.flush()
        self._last_print = time.monotonic()

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        statuses = {t.trial_id: t.status for t in trials}
        changed = statuses != self._statuses
        self._statuses = statuses
        if changed or (time.monotonic() - self._last_print > self.refresh_s and
                       any(t.status == "RUNNING" for t in trials)):
            self._print(trials)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_last_print"] = 0.0
        state["_statuses"] = {}
        return state


class SealState(Callback):
    """Seals the driver's staging copy of the experiment folder whenever Tune saves it: Tune calls
    ``get_state`` of every callback right after writing its state files and before uploading the folder.
    Stateless for Tune (returns None, so no callback-states file is written)."""

    def __init__(self, experiment_path: str) -> None:
        self.sealer = StateSealer(experiment_path)

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self.sealer.note_trials(trials)

    def get_state(self) -> None:
        try:
            self.sealer.seal_staging()
        except Exception as e:  # sealing must never stop the sweep; the end-of-sweep seal follows
            log.warning("could not seal the sweep state (%s: %s)", type(e).__name__, e)
        return None
