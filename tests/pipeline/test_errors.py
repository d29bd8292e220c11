"""Every command ends in one line naming the file or key and the way out, never in a traceback; impossible
sizes and invalid values are refused at config time, before Ray starts (issue 17, item 6).

The commands run through the real entry point (``pipeline.cli.main``, in this process for speed; in a
subprocess where the process itself must differ: without the capability to ignore file permissions, or
under a file-size limit)."""
from __future__ import annotations

import errno
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.pipeline.trainer_helpers import TINY
from tests.sharding.shardtest_helpers import REPO, crop, real_photo, save

TRAIN = [*TINY, "train.steps=2"]


def cscctrl(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str, command: str) -> str:
    """The command's one error line (stderr may also hold warnings); no traceback anywhere."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.strip().splitlines() if line.startswith(f"cscctrl {command}: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------------------------
# Config files and values
# ----------------------------------------------------------------------------------------------


def test_invalid_yaml_names_the_file_and_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  lam: [0.1, 0.2\ntrain: {steps: 3}\n")
    code, _, err = cscctrl(capsys, "train", "-c", str(bad), "--print-config")
    line = error_line(err, "train")
    assert code == 2 and str(bad) in line and "not valid YAML (line" in line


def test_a_folder_given_as_the_config_file_is_named(tmp_path, capsys):
    folder = tmp_path / "configs.yaml"
    folder.mkdir()
    code, _, err = cscctrl(capsys, "train", "-c", str(folder), "--print-config")
    line = error_line(err, "train")
    assert code == 2 and str(folder) in line and "cannot be read" in line


@pytest.mark.parametrize("items, key", [
    (["model.lam=1e999"], "model.lam"),                        # inf
    (["optim.decoder.lr=1e400"], "optim.decoder.lr"),          # inf
    (["scaling.cpus_per_worker=-1"], "scaling.cpus_per_worker"),
    (["data.loader_workers=-2"], "data.loader_workers"),
    (["scaling.max_failures=-5"], "scaling.max_failures"),
])
def test_invalid_values_are_refused_at_config_time(items, key, tmp_path, capsys):
    code, out, err = cscctrl(capsys, "train", *TRAIN, f"run.storage_path={tmp_path}", *items)
    assert code == 2 and key in error_line(err, "train")
    assert "[cscctrl] run" not in out and not list(tmp_path.iterdir())  # nothing started, nothing written


def test_nan_from_a_yaml_file_is_refused_naming_the_key(tmp_path, capsys):
    f = tmp_path / "nan.yaml"
    f.write_text("optim:\n  encoder:\n    lr: .nan\n")
    code, _, err = cscctrl(capsys, "train", "-c", str(f), "--print-config")
    assert code == 2 and "optim.encoder.lr" in error_line(err, "train") and "finite" in err


@pytest.mark.parametrize("item, key", [
    ("train.batch_size_per_worker=1000000000", "train.batch_size_per_worker"),
    ("model.ndf=10000000", "model.ndf"),
    ("model.image_size=1000000", "model.image_size"),
])
def test_impossible_sizes_are_refused_before_any_allocation(item, key, tmp_path, capsys):
    code, out, err = cscctrl(capsys, "train", *TRAIN, f"run.storage_path={tmp_path}", item)
    line = error_line(err, "train")
    assert code == 2 and key in line and "needs at least" in line and "[cscctrl] run" not in out


def test_gpu_requested_on_a_cpu_build_is_refused(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code, _, err = cscctrl(capsys, "train", *TRAIN, f"run.storage_path={tmp_path}", "scaling.use_gpu=true")
    assert code == 2 and "scaling.use_gpu" in error_line(err, "train")


# ----------------------------------------------------------------------------------------------
# Data: a split without samples, a damaged manifest, a shard that cannot be read
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def empty_val_shards(tmp_path_factory) -> Path:
    """Real photo crops in train/; val/ holds only a file that is not an image (rejected at decode time)."""
    from sharding.plan import plan_shards
    from sharding.sources import open_source
    from sharding.storage import Destination
    from sharding.write import shard_source

    root = tmp_path_factory.mktemp("empty-val")
    for c, name in enumerate(("astronaut", "coffee")):
        for i in range(4):
            save(root / "src" / "train" / name / f"{name}{i}.png", crop(real_photo(name), 8 * i, 8 * c, 40, 40), "PNG")
    (root / "src" / "val" / "astronaut").mkdir(parents=True)
    (root / "src" / "val" / "astronaut" / "broken.jpg").write_bytes(b"not a jpeg at all" * 20)
    shard_source(plan_shards(open_source(str(root / "src"))), Destination(str(root / "shards")))
    return root / "shards"


@pytest.mark.parametrize("items, key", [
    (["data.train_split=val"], "data.train_split"),
    (["data.eval_split=val"], "data.eval_split"),
])
def test_a_split_without_samples_is_refused_naming_the_key(empty_val_shards, items, key, tmp_path, capsys):
    from sharding.manifest import read_manifest

    assert read_manifest(str(empty_val_shards)).num_samples("val") == 0
    base = [i for i in TRAIN if not i.startswith("data.synthetic")]
    code, out, err = cscctrl(capsys, "train", *base, f"data.shards={empty_val_shards}", "data.loader_workers=0",
                             f"run.storage_path={tmp_path}", *items)
    line = error_line(err, "train")
    assert code == 2 and key in line and "holds no samples" in line and "[cscctrl] run" not in out


def test_a_damaged_manifest_is_named_by_verify_and_train(demo_shards, tmp_path, capsys):
    dest = tmp_path / "shards"
    shutil.copytree(demo_shards, dest)
    (dest / "manifest.json").write_bytes(b"{\"format\": \"cscctrl-shards/1\", \"spl")
    code, _, err = cscctrl(capsys, "verify", str(dest), "--no-progress")
    line = error_line(err, "verify")
    assert code == 2 and "manifest.json is not valid JSON" in line and "cscctrl shard" in line
    code, _, err = cscctrl(capsys, "train", *TRAIN[:-1], "data.synthetic=false", f"data.shards={dest}",
                           f"run.storage_path={tmp_path / 'runs'}")
    assert code == 2 and "manifest.json is not valid JSON" in error_line(err, "train")

    shutil.rmtree(dest)
    shutil.copytree(demo_shards, dest)
    table = dest / "manifest" / "train-shards.parquet"
    table.write_bytes(table.read_bytes()[: 40])
    code, _, err = cscctrl(capsys, "verify", str(dest), "--no-progress")
    line = error_line(err, "verify")
    assert code == 2 and str(table) in line and "not a readable parquet table" in line


def test_verify_reports_a_shard_it_cannot_read_instead_of_failing(demo_shards, tmp_path, capsys):
    dest = tmp_path / "shards"
    shutil.copytree(demo_shards, dest)
    (dest / "val-000000.tar").unlink()
    (dest / "val-000000.tar").mkdir()  # a folder where the shard should be
    code, out, err = cscctrl(capsys, "verify", str(dest), "--no-progress")
    assert code == 1 and "Traceback" not in err
    assert "ALTERED   val/val-000000.tar: cannot be read" in out and "1 altered" in out


# ----------------------------------------------------------------------------------------------
# Paths and the file system
# ----------------------------------------------------------------------------------------------


def test_a_file_where_a_folder_is_expected_is_named(tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("a file, not a folder")
    code, out, err = cscctrl(capsys, "train", *TRAIN, f"run.storage_path={blocker / 'sub'}")
    line = error_line(err, "train")
    assert code == 2 and str(blocker) in line and "[cscctrl] run" not in out


def test_debug_shows_the_traceback(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("x")
    args = [sys.executable, "-m", "pipeline", "train", *TRAIN, f"run.storage_path={blocker / 'sub'}"]
    plain = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300)
    debug = subprocess.run([*args, "--debug"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and "--debug" in plain.stderr
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def _without_root_privileges() -> list[str]:
    """A command prefix that runs without the capabilities that let root ignore file permissions (nothing
    for an ordinary user)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: file permissions cannot be enforced")
    caps = "-dac_override,-dac_read_search,-fowner"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]


def test_permission_denied_names_the_path(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)  # readable, not writable
    try:
        proc = subprocess.run([*_without_root_privileges(), sys.executable, "-m", "pipeline", "train", *TRAIN,
                               f"run.storage_path={locked / 'runs'}"], capture_output=True, text=True, cwd=REPO,
                              timeout=300)
    finally:
        locked.chmod(0o755)
    line = error_line(proc.stderr, "train")
    assert proc.returncode == 2 and "permission denied" in line and str(locked / "runs") in line


def test_a_full_disk_names_the_file_being_written(tmp_path):
    """A write the file system refuses (here: the process's file-size limit, EFBIG, the way a quota or a
    full disk refuses it) ends in one line naming the file, not in a traceback from inside tarfile."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    proc = subprocess.run([sys.executable, "-m", "pipeline", "shard", "demo", str(tmp_path / "shards"),
                           "--demo-train", "64", "--demo-val", "0", "--demo-unseen", "0", "--workers", "1",
                           "--no-progress"], capture_output=True, text=True, cwd=REPO, timeout=300,
                          preexec_fn=limit, env={**os.environ, "TQDM_DISABLE": "1"})
    line = error_line(proc.stderr, "shard")
    assert proc.returncode == 1 and str(tmp_path / "shards") in line and "file too large" in line


def test_no_space_left_reads_as_such():
    from pipeline.errors import describe, exit_code

    e = OSError(errno.ENOSPC, "No space left on device", "/data/runs/x/state.pt")
    assert "no space left on the device holding /data/runs/x/state.pt" in describe(e) and exit_code(e) == 1
    assert "run the same command again" in describe(e)


# ----------------------------------------------------------------------------------------------
# Evaluation: a device this build does not have
# ----------------------------------------------------------------------------------------------


def test_eval_on_cuda_without_cuda_is_refused(demo_shards, tmp_path, capsys):
    import torch

    from models import build_models
    from pipeline.checkpoint import save_state
    from pipeline.config import load_config

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = load_config(None, TINY)
    encoder, decoder = build_models(cfg.model)
    save_state({"config": cfg.to_dict(), "encoder": encoder.state_dict(), "decoder": decoder.state_dict(),
                "step": 0}, tmp_path / "ckpt")
    code, _, err = cscctrl(capsys, "eval", str(tmp_path / "ckpt"), "--data", demo_shards, "--device", "cuda",
                           "--no-fd")
    line = error_line(err, "eval")
    assert code == 2 and "--device cuda" in line and "--device cpu" in line
