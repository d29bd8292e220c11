"""`cscctrl shard` leaves nothing behind and no job undoes another: pool workers end with their parent,
a second job on the same DEST is refused naming the first, and a file name that is not UTF-8 is rejected
with its reason instead of aborting the job (issue 17, item 7). Real processes, real image files."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sharding.lock import DestinationBusy, DestLock
from sharding.manifest import read_manifest
from sharding.storage import Destination
from tests.sharding.shardtest_helpers import REPO, crop, real_photo, run_cli, save

SLOW_JOB = ["demo", "--demo-train", "3000", "--demo-val", "0", "--demo-unseen", "0", "--shard-maxcount", "100",
            "--no-progress"]


def _shard(dest: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "shard", SLOW_JOB[0], str(dest), *SLOW_JOB[1:], *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"})


def _wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_killing_the_shard_parent_ends_its_pool_workers(tmp_path):
    import psutil

    job = _shard(tmp_path / "shards", "--workers", "2")
    workers: list[psutil.Process] = []
    try:
        def pool_started() -> bool:
            workers[:] = [p for p in psutil.Process(job.pid).children() if "multiprocessing" in " ".join(p.cmdline())
                          and "resource_tracker" not in " ".join(p.cmdline())]
            return len(workers) == 2
        assert _wait_for(pool_started, 120), "the pool did not start"
        assert _wait_for(lambda: any((tmp_path / "shards").glob(".train-*.tmp")), 60)  # writing shards
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)
        _gone, alive = psutil.wait_procs(workers, timeout=15)
        assert not alive, f"pool workers still running after their parent was killed: {[p.pid for p in alive]}"
    finally:
        for p in workers:
            if p.is_running():
                p.kill()
        if job.poll() is None:
            job.kill()


@pytest.mark.slow
def test_a_second_job_on_the_same_dest_is_refused_naming_the_first(tmp_path):
    dest = tmp_path / "shards"
    first = _shard(dest, "--workers", "1")
    try:
        assert _wait_for(lambda: any((dest / "_parts").glob(".holder-*.json")), 120), "the first job did not start"
        second = run_cli("shard", SLOW_JOB[0], str(dest), *SLOW_JOB[1:], "--workers", "1")
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"process {first.pid} on " in second.stderr and "cscctrl" in second.stderr
        assert "run this command again" in second.stderr
        _out, err = first.communicate(timeout=600)
        assert first.returncode == 0, err[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert read_manifest(str(dest)).num_samples("train") == 3000
    assert not list((dest / "_parts").glob(".holder-*.json"))


def test_range_jobs_share_dest_and_a_full_job_waits_for_them(tmp_path):
    dest = Destination(str(tmp_path))
    with (DestLock(dest, exclusive=False), DestLock(dest, exclusive=False),  # two shard ranges at once
          pytest.raises(DestinationBusy, match=f"process {os.getpid()} on .* writing a shard range")):
        DestLock(dest, exclusive=True).__enter__()
    with (DestLock(dest, exclusive=True),  # released: a full job may start
          pytest.raises(DestinationBusy, match="writing all shards")):
        DestLock(dest, exclusive=False).__enter__()


def test_a_file_name_that_is_not_utf8_is_rejected_not_fatal(tmp_path):
    src = tmp_path / "src"
    for c, name in enumerate(("astronaut", "coffee")):
        for i in range(3):
            save(src / name / f"{name}{i}.png", crop(real_photo(name), 8 * i, 8 * c, 32, 32), "PNG")
    bad_file = os.fsencode(src / "coffee") + b"/caf\xe9.png"  # Latin-1 bytes: not UTF-8
    with open(bad_file, "wb") as f:
        f.write((src / "coffee" / "coffee0.png").read_bytes())
    os.mkdir(os.fsencode(src) + b"/\xe9t\xe9")  # a class folder whose name is not UTF-8
    with open(os.fsencode(src) + b"/\xe9t\xe9/x.png", "wb") as f:
        f.write((src / "coffee" / "coffee0.png").read_bytes())
    result = run_cli("shard", str(src), str(tmp_path / "shards"), "--workers", "1", "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = read_manifest(str(tmp_path / "shards"))
    assert manifest.num_samples("train") == 6 and manifest.class_names == ["astronaut", "coffee"]
    rejected = {r["source"]: r["reason"] for r in manifest.rejected().to_pylist()}
    assert rejected["coffee/caf\\xe9.png"].startswith("file name is not valid UTF-8")
    assert rejected["\\xe9t\\xe9"].startswith("folder name is not valid UTF-8")
