"""Applying a trained model (issue 18, item 5): `cscctrl encode` and `cscctrl reconstruct` from a checkpoint
and from the registry, and the registered model as MLflow users load it. A small grey model, initialised and
checkpointed, is logged and registered the way training does (MLflowTracker.log_model) in a real sqlite
store; the data are real demo shards and real image files. (The demo test does the same on the demo's
trained, registered model: tests/pipeline/test_demo.py.)"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from models import build_models
from pipeline import cli
from pipeline.checkpoint import save_state
from pipeline.config import load_config
from sharding.manifest import read_manifest
from tests.sharding.shardtest_helpers import crop, real_photo, save

NAME, ALIAS = "apply-me", "candidate"


@pytest.fixture(scope="module")
def registered(demo_shards, tmp_path_factory):
    """(config, encoder, decoder, checkpoint dir, tracking URI): a grey debug model whose BatchNorm statistics
    come from one pass over the training split, checkpointed and registered as NAME@ALIAS."""
    from pipeline.tracking import MLflowTracker
    from sharding.stream import make_eval_loader

    root = tmp_path_factory.mktemp("apply")
    uri = f"sqlite:///{root}/mlflow.db"
    cfg = load_config(None, ["model.preset=csc_ctrl_debug", "model.in_channels=1", f"data.shards={demo_shards}",
                             f"run.storage_path={root}", "run.name=apply", f"tracking.uri={uri}",
                             f"tracking.registered_model={NAME}", f"tracking.alias={ALIAS}",
                             "scaling.num_workers=0"])
    torch.manual_seed(0)
    encoder, decoder = build_models(cfg.model)
    with torch.no_grad():
        for x, _ in make_eval_loader(demo_shards, "train", image_size=32, batch_size=64, num_workers=0, channels=1):
            decoder(encoder(x))
        # As after an optimizer step in training: the atoms moved, and the next forward tracks L by a few
        # warm-started power iterations (which a checkpoint loaded back replaces by a cold start).
        for p in [*encoder.parameters(), *decoder.parameters()]:
            if p.dim() == 4:
                p.add_(0.3 * torch.randn_like(p))
        decoder(encoder(x))
    ckpt = root / "apply" / "checkpoint_step000000000"
    save_state({"config": cfg.to_dict(), "encoder": encoder.state_dict(), "decoder": decoder.state_dict(),
                "step": 0}, ckpt)
    tracker = MLflowTracker(cfg, "apply", run_dir=str(root / "apply"))
    images = next(iter(make_eval_loader(demo_shards, "val", image_size=32, batch_size=4, num_workers=0,
                                        channels=1)))[0]
    assert tracker.log_model(encoder, decoder, images) == "1"
    tracker.finish()
    return cfg, encoder.eval(), decoder.eval(), ckpt, uri


def _cscctrl(*argv: str) -> int:
    return cli.main([*map(str, argv), "--no-progress"])


def _image_folder(root: Path) -> Path:
    """Real photos of other sizes, modes and formats in class folders, a grey one at the top, a broken file."""
    folder = root / "images"
    save(folder / "astronaut" / "face.jpg", crop(real_photo("astronaut"), 0, 100, 300, 220), "JPEG", quality=90)
    rgba = Image.fromarray(crop(real_photo("coffee"), 50, 50, 120, 200)).convert("RGBA")
    save(folder / "coffee" / "cup.png", rgba, "PNG")
    save(folder / "camera.png", real_photo("camera"), "PNG")  # grey, 512 x 512
    (folder / "coffee" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    return folder


def test_the_registered_model_holds_f_and_says_what_it_takes(registered):
    import mlflow

    from pipeline.model_export import Autoencoder
    from pipeline.tracking import tracking_uri_set_to

    _cfg, encoder, decoder, _, uri = registered
    with tracking_uri_set_to(uri):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@{ALIAS}")
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}@{ALIAS}"))
    signature = model.metadata.signature
    assert signature.inputs.inputs[0].shape == (-1, 1, 32, 32) and signature.outputs.inputs[0].shape == (-1, 1, 32, 32)
    meta = model.metadata.metadata
    assert (meta["image_size"], meta["in_channels"], meta["nz"], meta["stages"]) == (32, 1, 16, 4)
    assert "[-1, 1]" in meta["input"] and (local / meta["features_file"]).is_file()
    example = json.loads((local / "input_example.json").read_text())
    assert np.asarray(example).shape == (2, 1, 32, 32) and np.asarray(example).std() > 0.1  # real images

    x = torch.rand(3, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = Autoencoder(encoder, decoder)(x).numpy()
    np.testing.assert_allclose(model.predict(x.numpy()), expected, rtol=1e-4, atol=1e-5)  # reconstructions


def test_the_registered_model_is_the_checkpoint_loaded_back(registered):
    """The function MLflow serves is the one `cscctrl eval` and `encode` rebuild from the checkpoint."""
    import mlflow

    from pipeline.evaluate import load_trained
    from pipeline.model_export import Autoencoder
    from pipeline.tracking import tracking_uri_set_to

    *_, ckpt, uri = registered
    _, encoder, decoder, _ = load_trained(str(ckpt))
    with tracking_uri_set_to(uri):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@{ALIAS}")
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = Autoencoder(encoder.eval(), decoder.eval())(x).numpy()
    np.testing.assert_allclose(model.predict(x.numpy()), expected, rtol=1e-4, atol=1e-5)


def test_encode_a_shard_set_from_the_registry(registered, demo_shards, tmp_path):
    from pipeline.model_export import FeatureExtractor

    _, encoder, _, ckpt, uri = registered
    out = tmp_path / "features.parquet"
    assert _cscctrl("encode", f"models:/{NAME}@{ALIAS}", demo_shards, out, "--tracking-uri", uri,
                    "--split", "val,unseen", "--workers", "0", "--batch-size", "48") == 0
    table = pq.read_table(out)
    manifest = read_manifest(demo_shards)
    rows = table.to_pydict()
    for split in ("val", "unseen"):
        keys = [k for k, s in zip(rows["key"], rows["split"]) if s == split]
        assert sorted(keys) == sorted(manifest.samples(split).column("key").to_pylist())
    assert table.num_rows == 128 and table.schema.field("z").type.list_size == 16
    assert set(table.column_names) == {"key", "split", "label", "label_name", "z", "nonzero_stage1",
                                       "nonzero_stage2", "nonzero_stage3", "nonzero_stage4"}
    assert b"cscctrl.model" in table.schema.metadata
    z = np.stack(rows["z"])
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    names = {c.label: c.name for c in manifest.classes}
    assert all(names[label] == name for label, name in zip(rows["label"], rows["label_name"]))

    # The same rows as the checkpoint's networks give for the same images.
    again = tmp_path / "from-checkpoint.parquet"
    assert _cscctrl("encode", ckpt, demo_shards, again, "--split", "val,unseen", "--workers", "0") == 0
    np.testing.assert_allclose(np.stack(pq.read_table(again).column("z").to_pylist()), z, atol=1e-5)
    from sharding.stream import make_eval_loader

    x, _, keys = next(iter(make_eval_loader(demo_shards, "val", image_size=32, batch_size=8, num_workers=0,
                                            channels=1, with_keys=True)))
    with torch.no_grad():
        z_ref, nonzero = FeatureExtractor(encoder)(x)
    first = {k: i for i, k in enumerate(rows["key"])}
    for j, key in enumerate(keys):
        np.testing.assert_allclose(z[first[key]], z_ref[j].numpy(), atol=1e-5)
        assert rows["nonzero_stage1"][first[key]] == pytest.approx(float(nonzero[j, 0]), abs=1e-6)


def test_encode_an_image_folder_labels_by_folder_and_lists_what_it_refused(registered, tmp_path):
    *_, ckpt, _ = registered
    folder = _image_folder(tmp_path)
    out = tmp_path / "folder.parquet"
    assert _cscctrl("encode", ckpt, folder, out, "--workers", "0") == 0
    rows = pq.read_table(out).to_pydict()
    assert rows["key"] == ["astronaut/face.jpg", "camera.png", "coffee/cup.png"]  # path order
    assert rows["label_name"] == ["astronaut", None, "coffee"] and rows["label"] == [0, None, 1]
    assert rows["split"] == ["", "", ""]
    with open(f"{out}.refused.csv") as f:
        refused = list(csv.DictReader(f))
    assert [r["path"] for r in refused] == ["coffee/broken.jpg"] and refused[0]["reason"].startswith("not an image")


def test_reconstruct_images_of_any_size_as_the_registered_model_does(registered, tmp_path):
    import mlflow

    from pipeline.image_files import load_image
    from pipeline.tracking import tracking_uri_set_to

    *_, uri = registered
    folder = _image_folder(tmp_path)
    out = tmp_path / "recon"
    assert _cscctrl("reconstruct", f"models:/{NAME}@{ALIAS}", folder, out, "--tracking-uri", uri) == 0
    with open(out / "reconstructions.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["key"] for r in table] == ["astronaut/face.jpg", "camera.png", "coffee/cup.png"]
    assert [r["file"] for r in table] == ["astronaut/face.jpg.png", "camera.png", "coffee/cup.png"]
    with tracking_uri_set_to(uri):
        model = mlflow.pyfunc.load_model(f"models:/{NAME}@{ALIAS}")
    for row in table:
        x = load_image(folder / row["key"], 32, 1)[None]
        expected = model.predict(x.numpy())
        with Image.open(out / "reconstructions" / row["file"]) as img:
            assert img.size == (32, 32) and img.mode == "L"
            written = np.asarray(img, np.float64)
        np.testing.assert_allclose(written, np.clip(np.round((expected[0, 0] + 1) * 127.5), 0, 255), atol=1)
        mse = float(np.mean((expected - x.numpy()) ** 2))
        assert float(row["psnr_db"]) == pytest.approx(10 * np.log10(4 / mse), abs=1e-3)
        with Image.open(out / "pairs" / row["file"]) as pair:  # zoom auto: 4 x 32 px, two tiles, 8 px gaps
            assert pair.size == (2 * 128 + 3 * 8, 128 + 2 * 8)
    assert (out / "grid.png").is_file()
    with open(out / "refused.csv") as f:
        assert [r["path"] for r in csv.DictReader(f)] == ["coffee/broken.jpg"]


def test_a_version_logged_before_the_features_program_encodes_through_its_runs_checkpoint(registered, tmp_path,
                                                                                         demo_shards):
    """Versions registered by earlier releases hold g∘f only: encode finds f in the checkpoint of the run
    that logged them, and says so when that cannot be read."""
    import mlflow

    from pipeline.model_export import Autoencoder
    from pipeline.tracking import MLflowTracker, tracking_uri_set_to

    cfg, encoder, decoder, _ckpt, uri = registered
    tracker = MLflowTracker(cfg, "apply")  # the run that holds the checkpoint's run name and storage
    with tracking_uri_set_to(uri), mlflow.start_run(run_id=tracker.run_id):
        mlflow.pytorch.log_model(Autoencoder(encoder, decoder), name="model", registered_model_name="old",
                                 input_example=torch.zeros(2, 1, 32, 32).numpy(), pip_requirements=["torch"])
    tracker.finish()
    out = tmp_path / "old.parquet"
    assert _cscctrl("encode", "models:/old/1", demo_shards, out, "--tracking-uri", uri, "--split", "val",
                    "--workers", "0") == 0
    assert pq.read_table(out).num_rows == 64


def test_encode_names_what_is_wrong_and_the_way_out(registered, tmp_path, demo_shards, capsys):
    *_, ckpt, uri = registered
    out = tmp_path / "f.parquet"
    out.write_bytes(b"earlier results")
    assert _cscctrl("encode", ckpt, demo_shards, out) == 2
    assert "exists: pass --overwrite" in capsys.readouterr().err and out.read_bytes() == b"earlier results"
    assert _cscctrl("encode", "models:/no-such-model@x", demo_shards, tmp_path / "g.parquet", "--tracking-uri",
                    uri) == 2
    assert "not found in the MLflow store" in capsys.readouterr().err
    assert _cscctrl("encode", ckpt, demo_shards, tmp_path / "h.parquet", "--split", "test") == 2
    assert "--split test: not in" in capsys.readouterr().err
    assert _cscctrl("encode", ckpt, tmp_path / "nothing-here", tmp_path / "i.parquet") == 2
    assert "no such file or folder" in capsys.readouterr().err.lower()
    assert not list(tmp_path.glob("*.partial"))
