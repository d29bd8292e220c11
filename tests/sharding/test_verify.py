"""`cscctrl verify`: missing, truncated and altered shards are reported, with a non-zero exit."""
from __future__ import annotations

import io
import shutil
import tarfile

from sharding.verify import verify_shards
from tests.sharding.shardtest_helpers import run_cli


def test_intact_shards_verify_ok(demo_shards):
    report = verify_shards(str(demo_shards))
    assert report.ok and report.counts() == {"ok": 14, "missing": 0, "truncated": 0, "altered": 0}
    assert report.samples_checked == 320


def test_missing_truncated_and_altered_shards_are_reported(demo_shards, tmp_path):
    dest = tmp_path / "shards"
    shutil.copytree(demo_shards, dest)
    (dest / "val-000002.tar").unlink()
    truncated = dest / "train-000003.tar"
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    # Flip one byte inside an image member: same size, different content.
    altered = dest / "train-000007.tar"
    with tarfile.open(altered) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    raw = bytearray(altered.read_bytes())
    raw[member.offset_data + 100] ^= 0xFF
    altered.write_bytes(bytes(raw))

    report = verify_shards(str(dest))
    status = {c.name: c.status for c in report.checks}
    assert status["val-000002.tar"] == "missing"
    assert status["train-000003.tar"] == "truncated"
    assert status["train-000007.tar"] == "altered"
    assert report.counts() == {"ok": 11, "missing": 1, "truncated": 1, "altered": 1}
    detail = next(c.detail for c in report.checks if c.name == "train-000007.tar")
    assert "sha256" in detail and "1 samples changed" in detail and member.name.split(".")[0] in detail

    result = run_cli("verify", str(dest), "--no-progress")
    assert result.returncode == 1
    assert "MISSING" in result.stdout and "TRUNCATED" in result.stdout and "ALTERED" in result.stdout
    assert result.stdout.strip().splitlines()[-1].endswith(
        "14 shards, 11 ok, 1 missing, 1 truncated, 1 altered (260 samples checked)")


def test_a_shard_with_an_extra_sample_is_altered(demo_shards, tmp_path):
    dest = tmp_path / "shards"
    shutil.copytree(demo_shards, dest)
    path = dest / "unseen-000000.tar"
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    png = next(data for name, data in members if name.endswith(".png"))
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members + [("intruder.cls", b"0"), ("intruder.png", png)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    check = next(c for c in verify_shards(str(dest)).checks if c.name == "unseen-000000.tar")
    assert check.status == "altered"
    assert "21 samples, manifest says 20" in check.detail and "1 unexpected samples (e.g. intruder)" in check.detail


def test_verify_without_a_manifest_exits_2(tmp_path):
    result = run_cli("verify", str(tmp_path))
    assert result.returncode == 2 and "manifest.json" in result.stderr
