"""Bad input: converted correctly or rejected with a reason, never a crash; bad arguments fail before
any work; the reader refuses unsafe tar members, never unpickles, and skips corrupt shards."""
from __future__ import annotations

import io
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import traceback
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sharding.manifest import read_manifest
from sharding.plan import plan_shards
from sharding.sources import ImageFolderSource
from sharding.storage import Destination
from sharding.stream import MAX_CONSECUTIVE_BAD_SHARDS, make_eval_loader, make_train_loader
from sharding.write import shard_source
from tests.sharding.shardtest_helpers import crop, real_photo, run_cli, save


def build_odd_folder(root: Path) -> None:
    photo = crop(real_photo("coffee"), 50, 50, 40, 60)
    for i in range(3):
        save(root / "good" / f"g{i}.jpg", crop(real_photo("chelsea"), 10 * i, 0, 40, 40), "JPEG")
    odd = root / "odd"
    full = io.BytesIO()
    Image.fromarray(photo).save(full, format="JPEG")
    odd.mkdir(parents=True)
    (odd / "truncated.jpg").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    (odd / "empty.jpg").write_bytes(b"")
    (odd / "notes.png").write_bytes(b"these are notes, not a picture\n" * 10)
    save(odd / "cmyk.jpg", Image.fromarray(photo).convert("CMYK"), "JPEG")
    save(odd / "gray16.png", (photo[..., 0].astype(np.uint16) * 257), "PNG")
    save(odd / "palette.png", Image.fromarray(photo).quantize(16), "PNG")
    save(odd / "alpha.png", np.dstack([photo, np.full(photo.shape[:2], 128, np.uint8)]), "PNG")
    save(odd / "gray.jpg", photo[..., 1], "JPEG")
    save(odd / "bomb.png", Image.new("1", (20000, 20000)), "PNG")
    os.symlink(odd / "loop_b.jpg", odd / "loop_a.jpg")
    os.symlink(odd / "loop_a.jpg", odd / "loop_b.jpg")


def test_odd_files_are_converted_or_rejected_with_reasons(tmp_path):
    build_odd_folder(tmp_path / "src")
    result = run_cli("shard", str(tmp_path / "src"), str(tmp_path / "out"), "--workers", "1")
    assert result.returncode == 0, result.stderr
    assert "rejected 6 (" in result.stdout and "symlink loop 2" in result.stdout
    manifest = read_manifest(str(tmp_path / "out"))
    reasons = {Path(r["source"]).name: r["reason"] for r in manifest.rejected().to_pylist()}
    assert set(reasons) == {"truncated.jpg", "empty.jpg", "notes.png", "bomb.png", "loop_a.jpg", "loop_b.jpg"}
    assert reasons["truncated.jpg"].startswith("corrupt or truncated image")
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert reasons["notes.png"].startswith("not an image")
    assert reasons["bomb.png"].startswith("decompression bomb") and reasons["loop_a.jpg"] == "symlink loop"
    assert manifest.summary["rejected"]["total"] == 6
    rows = {Path(r["source"]).name: r for r in manifest.samples("train").to_pylist()}
    assert {n: rows[n]["converted"] for n in ("cmyk.jpg", "gray16.png", "palette.png", "alpha.png", "gray.jpg")} == {
        "cmyk.jpg": True, "gray16.png": True, "palette.png": True, "alpha.png": True, "gray.jpg": False}
    loader = make_eval_loader(manifest, "train", image_size=32, batch_size=64, num_workers=0, with_keys=True)
    x, _labels, keys = next(iter(loader))
    assert x.shape == (8, 3, 32, 32) and loader.stats.corrupt_samples == 0
    gray = x[keys.index("odd_gray")]
    assert torch_equal(gray[0], gray[1]) and torch_equal(gray[1], gray[2])  # grey replicated to RGB


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def _shard_as_nobody(src: Path, dest: Path) -> int:
    """Run the whole shard job in a forked child that dropped root, so permission bits apply."""
    pid = os.fork()
    if pid == 0:  # child
        status = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            shard_source(plan_shards(ImageFolderSource(src)), Destination(str(dest)))
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_unreadable_file_and_folder_are_rejected_with_permission_denied(tmp_path):
    base = Path(tempfile.mkdtemp(prefix="cscctrl-perm-"))
    try:
        base.chmod(0o755)
        src = base / "src"
        for name in ("ok", "secret"):
            save(src / "cls" / f"{name}.png", crop(real_photo("astronaut"), 0, 0, 24, 24), "PNG")
        save(src / "cls" / "locked" / "inner.png", crop(real_photo("astronaut"), 0, 0, 24, 24), "PNG")
        for p in (base, src, src / "cls"):
            p.chmod(0o755)
        for p in (src / "cls" / "ok.png", src / "cls" / "secret.png"):
            p.chmod(0o644)
        (src / "cls" / "secret.png").chmod(0o000)
        (src / "cls" / "locked").chmod(0o000)
        dest = base / "dest"
        dest.mkdir(mode=0o777)
        dest.chmod(0o777)
        if os.geteuid() == 0:
            # Root reads chmod-000 files anyway. Warm up lazy imports as root, then drop to 'nobody'.
            shard_source(plan_shards(ImageFolderSource(src)), Destination(str(base / "warm")))
            assert _shard_as_nobody(src, dest) == 0
        else:
            shard_source(plan_shards(ImageFolderSource(src)), Destination(str(dest)))
        manifest = read_manifest(str(dest))
        reasons = {r["source"]: r["reason"] for r in manifest.rejected().to_pylist()}
        assert reasons == {"cls/secret.png": "cannot read file: permission denied",
                           "cls/locked": "directory unreadable: permission denied"}
        assert manifest.samples("train").column("key").to_pylist() == ["cls_ok"]
    finally:
        for p in (base / "src" / "cls" / "locked",):
            if p.exists():
                p.chmod(0o755)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("dest,needle", [
    ("/proc/cscctrl-no-such-dir/shards", "not writable"),
    ("nosuchscheme://bucket/shards", "unknown URL scheme 'nosuchscheme'"),
])
def test_bad_dest_fails_before_any_work(photo_folder, dest, needle):
    result = run_cli("shard", str(photo_folder), dest, "--workers", "1")
    assert result.returncode == 2 and needle in result.stderr and dest.split("/")[0] in result.stderr


def test_dest_below_a_file_fails_naming_it(photo_folder, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run_cli("shard", str(photo_folder), str(blocker / "shards"), "--workers", "1")
    assert result.returncode == 2 and "not writable" in result.stderr and str(blocker) in result.stderr


class _Payload:
    """Unpickling this creates a file: proof that nothing was unpickled is that the file is absent."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_reader_refuses_unsafe_members_and_never_unpickles(demo_shards, tmp_path):
    dest = tmp_path / "shards"
    shutil.copytree(demo_shards, dest)
    png = io.BytesIO()
    Image.fromarray(crop(real_photo("rocket"), 0, 0, 16, 16)).save(png, format="PNG")
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(_Payload(str(marker)))
    with tarfile.open(dest / "unseen-000000.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in [("a.cls", b"1"), ("a.png", png.getvalue()),
                           ("/abs.cls", b"2"), ("/abs.png", png.getvalue()),
                           ("../up.cls", b"3"), ("../up.png", png.getvalue()),
                           ("b.cls", b"4"), ("b.pickle", payload), ("b.png", png.getvalue()), ("b.pyd", payload),
                           ("c.cls", b"5"), ("c.pyd", payload)]:
            _member(tar, name, data)
    loader = make_eval_loader(str(dest), "unseen", image_size=16, batch_size=8, num_workers=0, with_keys=True)
    keys = [k for _, _, ks in loader for k in ks]
    assert keys == ["a", "b"]
    assert loader.stats.unsafe_members == 4 and loader.stats.corrupt_samples == 1  # c: no image member
    assert not marker.exists()


def test_training_skips_and_counts_corrupt_shards(demo_shards, tmp_path, caplog):
    dest = tmp_path / "shards"
    shutil.copytree(demo_shards, dest)
    for i in range(0, 10, 2):  # every other training shard: truncated or garbage
        path = dest / f"train-{i:06d}.tar"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3] if i % 4 == 0 else os.urandom(len(data)))
    loader = make_train_loader(str(dest), image_size=8, batch_size=8, steps_per_epoch=30, num_workers=0,
                               seed=0, rank=0, world_size=1, shuffle_buffer=16)
    with caplog.at_level(logging.WARNING, logger="sharding.stream"):
        batches = [x.shape[0] for x, _ in loader]
    assert batches == [8] * 30
    assert loader.stats.corrupt_shards >= 1
    assert sum("skipping corrupt shard" in r.message for r in caplog.records) == loader.stats.corrupt_shards


def test_training_gives_up_when_every_shard_is_corrupt(demo_shards, tmp_path):
    dest = tmp_path / "shards"
    shutil.copytree(demo_shards, dest)
    for path in dest.glob("train-*.tar"):
        path.write_bytes(b"\0garbage" * 100)
    loader = make_train_loader(str(dest), image_size=8, batch_size=4, steps_per_epoch=3, num_workers=0, seed=0,
                               rank=0, world_size=1)
    with pytest.raises(RuntimeError, match="shard reads in a row failed"):
        list(loader)
    assert loader.stats.corrupt_shards == MAX_CONSECUTIVE_BAD_SHARDS
