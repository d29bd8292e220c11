"""Ray Tune's resume state is restored only when its seal verifies with a key that does not live in storage;
a planted pickle is refused before anything unpickles it (issue 17, item 4)."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest

from tuning.state_seal import SEAL_FILE, StateTrustError, seal, verify
from tests.sharding.shardtest_helpers import REPO


class _Payload:
    """Unpickling this creates a file: proof that nothing was unpickled is that the file is absent."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("CSCCTRL_STATE_KEY", "test-key-" + "0" * 32)


def _state(root):
    (root / "trial_a").mkdir(parents=True)
    (root / "tuner.pkl").write_bytes(pickle.dumps({"tuner": 1}))
    (root / "experiment_state-x.json").write_text('{"trial_data": []}')
    (root / "trial_a" / "params.pkl").write_bytes(pickle.dumps({"lam": 0.1}))
    (root / "trial_a" / "result.json").write_text('{"step": 1}\n')
    (root / "runs" / "sweep-a" / "checkpoint_step000000001").mkdir(parents=True)  # trial runs: not sealed here


def test_a_sealed_state_verifies_and_plain_data_may_grow(tmp_path, key):
    _state(tmp_path)
    sealed = seal(str(tmp_path))
    assert sorted(sealed) == ["experiment_state-x.json", "trial_a/params.pkl", "tuner.pkl"]
    (tmp_path / "trial_a" / "result.json").write_text('{"step": 1}\n{"step": 2}\n')  # appended after the save
    verify(str(tmp_path))


@pytest.mark.parametrize("tamper, needle", [
    (lambda r: (r / "trial_a" / "params.pkl").write_bytes(pickle.dumps({"lam": 9})), "changed: trial_a/params.pkl"),
    (lambda r: (r / "callback-states-x.pkl").write_bytes(b"planted"), "not written by cscctrl: callback-states-x.pkl"),
    (lambda r: (r / SEAL_FILE).write_text('{"files": {}, "mac": "00"}'), "not written with this machine's key"),
])
def test_anything_the_seal_does_not_cover_is_refused(tmp_path, key, tamper, needle):
    _state(tmp_path)
    seal(str(tmp_path))
    tamper(tmp_path)
    with pytest.raises(StateTrustError) as e:
        verify(str(tmp_path))
    assert needle in str(e.value)


def test_a_seal_made_with_another_key_is_refused(tmp_path, monkeypatch):
    _state(tmp_path)
    monkeypatch.setenv("CSCCTRL_STATE_KEY", "the key of whoever can write the bucket")
    seal(str(tmp_path))
    monkeypatch.setenv("CSCCTRL_STATE_KEY", "the sweep driver's own key")
    with pytest.raises(StateTrustError, match="not written with this machine's key"):
        verify(str(tmp_path))


def test_the_key_file_is_created_private_and_outside_storage(tmp_path, monkeypatch):
    from tuning.state_seal import state_key

    monkeypatch.delenv("CSCCTRL_STATE_KEY", raising=False)
    monkeypatch.setenv("CSCCTRL_STATE_KEY_FILE", str(tmp_path / "cfg" / "state.key"))
    key = state_key()
    assert len(key) == 32 and state_key() == key
    assert (tmp_path / "cfg" / "state.key").stat().st_mode & 0o777 == 0o600


def test_a_planted_pickle_in_a_sweep_folder_is_refused_before_ray_starts(demo_shards, tmp_path):
    """`cscctrl tune` finds Tune state it did not seal where its sweep would resume: it refuses, naming the
    file, and nothing is unpickled (the payload would create a file)."""
    from tuning.spec import load_sweep
    from tuning.sweep import plan_sweep

    items = [f"run.storage_path={tmp_path / 'runs'}", f"data.shards={demo_shards}", "train.steps=2"]
    plan = plan_sweep(load_sweep("debug", items))
    os.makedirs(plan.experiment_path)
    marker = tmp_path / "unpickled"
    with open(f"{plan.experiment_path}/tuner.pkl", "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    env = {**os.environ, "CSCCTRL_STATE_KEY_FILE": str(tmp_path / "key"), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "tune", "-c", "debug", *items], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "tuner.pkl" in proc.stderr and "--trust-sweep-state" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()
