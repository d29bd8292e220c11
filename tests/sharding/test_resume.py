"""Resumability and determinism: a SIGKILLed `python -m pipeline shard` resumes to byte-identical shards;
any subset of shard indices, in any order or process count, writes the same bytes."""
from __future__ import annotations

import filecmp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from sharding.plan import plan_shards
from sharding.sources import DemoSource
from sharding.storage import Destination
from sharding.write import PlanMismatchError, finalize, prepare_destination, shard_source, write_shards
from tests.sharding.shardtest_helpers import REPO, run_cli

DEMO_ARGS = ["--demo-train", "600", "--demo-val", "0", "--demo-unseen", "0", "--demo-size", "24",
             "--shard-maxcount", "20", "--seed", "4"]
NUM_SHARDS = 30


def demo_plan():
    """The plan the CLI builds from DEMO_ARGS."""
    return plan_shards(DemoSource(seed=4, train=600, val=0, unseen=0, size=24), shard_maxcount=20, seed=4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run, in-process."""
    dest = tmp_path_factory.mktemp("reference")
    plan = demo_plan()
    assert len(plan.shards) == NUM_SHARDS
    shard_source(plan, Destination(str(dest)))
    return dest


def shard_names(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.glob("train-*.tar"))


def assert_identical(a: Path, b: Path) -> None:
    assert shard_names(a) == shard_names(b) == [f"train-{i:06d}.tar" for i in range(NUM_SHARDS)]
    _, mismatch, errors = filecmp.cmpfiles(a, b, shard_names(a), shallow=False)
    assert not mismatch and not errors
    for table in ("train-samples", "train-shards", "classes", "rejected"):
        name = f"manifest/{table}.parquet"
        assert pq.read_table(a / name).equals(pq.read_table(b / name))
    assert (a / "manifest.json").read_text() == (b / "manifest.json").read_text()


def test_sigkill_mid_run_then_resume_gives_identical_bytes(tmp_path, reference):
    dest = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "shard", "demo", str(dest), "--workers", "1",
                             "--no-progress", *DEMO_ARGS], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not shard_names(dest) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)  # right after the first shard appears
    proc.wait(timeout=30)
    done_at_kill = shard_names(dest)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert 1 <= len(done_at_kill) < NUM_SHARDS and not (dest / "manifest.json").exists()

    result = run_cli("shard", "demo", str(dest), "--workers", "2", "--no-progress", *DEMO_ARGS)
    assert result.returncode == 0, result.stderr
    assert f"{len(done_at_kill)} already finished" in result.stdout
    assert_identical(dest, reference)
    assert not list(dest.glob(".*.tmp")) and not list((dest / "_parts").glob(".*.tmp"))


def test_any_index_subsets_in_any_order_write_identical_shards(tmp_path, reference):
    """What a fan-out over Ray tasks does: plan once, write disjoint index ranges, finalize."""
    plan = demo_plan()
    dest = Destination(str(tmp_path))
    prepare_destination(plan, dest)
    with pytest.raises(RuntimeError, match="not written yet"):
        finalize(plan, dest)
    report = write_shards(plan, dest, range(20, 30), workers=2)
    assert report.written == list(range(20, 30))
    write_shards(plan, dest, [5, 3, 1])
    report = write_shards(plan, dest, reversed(range(20)))
    assert report.skipped == [5, 3, 1] and len(report.written) == 17
    finalize(plan, dest)
    assert_identical(tmp_path, reference)


def test_a_different_plan_is_refused_unless_overwrite(tmp_path, reference):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    dest = Destination(str(tmp_path))
    other = plan_shards(DemoSource(seed=5, train=50, val=0, unseen=0, size=32), shard_maxcount=20, seed=5)
    with pytest.raises(PlanMismatchError, match="different plan"):
        prepare_destination(other, dest)
    result = run_cli("shard", "demo", str(tmp_path), "--seed", "5", "--demo-train", "50", "--demo-val", "0",
                     "--demo-unseen", "0", "--demo-size", "32", "--shard-maxcount", "20", "--workers", "1")
    assert result.returncode == 2 and "--overwrite" in result.stderr
    manifest, _ = shard_source(other, dest, overwrite=True)
    assert shard_names(tmp_path) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert manifest.num_samples("train") == 50


def test_cli_writes_a_range_of_shards_then_finishes(tmp_path):
    args = ["shard", "demo", str(tmp_path), "--demo-train", "60", "--demo-val", "0", "--demo-unseen", "0",
            "--demo-size", "16", "--shard-maxcount", "20", "--workers", "1", "--no-progress"]
    first = run_cli(*args, "--shards", "1")
    assert first.returncode == 0, first.stderr
    assert "1 shards written" in first.stdout and "manifest not written yet: 2 of 3 shards" in first.stdout
    assert shard_names(tmp_path) == ["train-000001.tar"] and not (tmp_path / "manifest.json").exists()
    rest = run_cli(*args)
    assert rest.returncode == 0 and "2 shards written, 1 already finished" in rest.stdout
    assert (tmp_path / "manifest.json").exists()


@pytest.mark.ray
def test_cli_on_ray_tasks_writes_identical_bytes(tmp_path, reference):
    """`cscctrl shard --ray`: Ray tasks over disjoint shard ranges (sharding/fanout.py) write the bytes one
    process writes."""
    dest = tmp_path / "ray"
    refused = run_cli("shard", "demo", str(dest), "--ray", "--shards", "0:2", *DEMO_ARGS)
    assert refused.returncode == 2 and "drop --shards" in refused.stderr
    result = run_cli("shard", "demo", str(dest), "--ray", "--tasks", "3", "--no-progress", *DEMO_ARGS,
                     env={"RAY_ADDRESS": ""}, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"{NUM_SHARDS} shards written, 0 already finished, 600 samples" in result.stdout
    assert "3 Ray task(s) on 1 node(s)" in result.stdout
    assert_identical(reference, dest)


def test_ensure_shards_writes_once_then_reuses_and_keeps_another_plans_shards(tmp_path, reference):
    from sharding.ensure import ensure_shards

    url = str(tmp_path / "cache")
    first = ensure_shards(demo_plan(), url)
    assert not first.reused and first.report.written == list(range(NUM_SHARDS))
    assert_identical(reference, tmp_path / "cache")
    times = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    again = ensure_shards(demo_plan(), url)
    assert again.reused and again.manifest.summary["fingerprint"] == demo_plan().fingerprint
    other = plan_shards(DemoSource(seed=5, train=50, val=0, unseen=0, size=24), shard_maxcount=20, seed=5)
    with pytest.raises(PlanMismatchError):
        ensure_shards(other, url)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()} == times
    replaced = ensure_shards(other, url, overwrite=True)  # a cache of the caller's own
    assert not replaced.reused and replaced.manifest.summary["fingerprint"] == other.fingerprint
    assert shard_names(tmp_path / "cache") == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
