"""The sweep file: precedence, type checks, errors before any trial starts; and the metric names it
accepts are exactly those a real trainer step and a real evaluation pass report."""
from __future__ import annotations

import pytest
import torch
import yaml

from pipeline.config import ConfigError, load_config
from pipeline.metric_names import evaluation_metrics, training_metrics
from tuning.spec import SWEEP_DIR, asha_grace_period, check_metric, load_sweep, sweep_name

DEBUG = {"model.preset": "csc_ctrl_debug"}


def write(tmp_path, doc) -> str:
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    return str(p)


def test_defaults_file_then_command_line(tmp_path):
    f = write(tmp_path, {"base": {"train.steps": 100, "model.preset": "csc_ctrl_debug"}, "num_samples": 3,
                         "space": "unroll", "asha": {"grace_period": 10}, "resources": {"num_workers": 2}})
    spec = load_sweep(f, ["train.steps=50", "num_samples=5", "asha.reduction_factor=3", "resources.use_gpu=true",
                          "space=[sparsity, unroll]"])
    assert spec.base == {"train.steps": 50, "model.preset": "csc_ctrl_debug"}   # item beats file
    assert spec.num_samples == 5 and spec.space == ["sparsity", "unroll"]
    assert spec.asha.grace_period == 10 and spec.asha.reduction_factor == 3.0   # file + item merge
    assert spec.resources.num_workers == 2 and spec.resources.use_gpu
    assert spec.search == "optuna" and spec.metric == "eval/psnr" and spec.mode == "max"  # defaults


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-5 as a string; sweep files read it as the number users mean."""
    f = write(tmp_path, "space:\n  optim.encoder.lr: {loguniform: [1e-5, 1E-3]}\nbase:\n  optim.decoder.lr: 2e-4\n")
    spec = load_sweep(f)
    assert spec.space == {"optim.encoder.lr": {"loguniform": [1e-5, 1e-3]}}
    assert spec.base == {"optim.decoder.lr": 2e-4}
    assert load_sweep(None, ["space={optim.encoder.lr: {loguniform: [1e-5, 1e-3]}}"]).space == {
        "optim.encoder.lr": {"loguniform": [1e-5, 1e-3]}}


def test_bundled_sweep_files_load():
    files = sorted(SWEEP_DIR.glob("*.yaml"))
    assert {f.stem for f in files} >= {"debug", "sparsity_unroll"}
    for f in files:
        load_sweep(f.stem)   # by bare name, as `cscctrl tune -c NAME`


@pytest.mark.parametrize("items, fragment", [
    (["num_sample=3"], "unknown config key 'num_sample'. Did you mean 'num_samples'?"),
    (["num_samples=0"], "num_samples=0: must be >= 1"),
    (["num_samples=two"], "'num_samples' must be an integer"),
    (["search=bayes"], "'search' must be one of 'optuna', 'random', 'grid'"),
    (["mode=maximize"], "'mode' must be one of 'max', 'min'"),
    (["scheduler=pbt"], "'scheduler' must be one of 'asha', 'none'"),
    (["asha.reduction_factor=1"], "asha.reduction_factor=1.0: must be > 1"),
    (["asha.grace=3"], "unknown config key 'asha.grace'"),
    (["resources.num_workers=0"], "needs at least 1 Ray Train worker"),
    (["resources.driver_cpus=0"], "resources.driver_cpus=0.0: must be > 0"),
    (["resources.gpus=1"], "Valid keys in resources: num_workers, cpus_per_worker, use_gpu, gpus_per_worker"),
    (["max_concurrent_trials=-1"], "must be >= 0"),
    (["name=my sweep"], "letters, digits"),
    (["scaling.num_workers=2"], "per-trial resources go under 'resources:'"),
    (["space={}"], "space: {} is empty"),
])
def test_bad_sweep_fields_fail_naming_the_field(items, fragment):
    with pytest.raises(ConfigError) as e:
        load_sweep(None, items)
    assert fragment in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found.*bundled sweeps: .*debug"):
        load_sweep("no-such-sweep")
    with pytest.raises(ConfigError, match="a sweep file is a mapping"):
        load_sweep(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="base key 'lam' is not a dotted config key"):
        load_sweep(write(tmp_path, {"base": {"lam": 0.1}}))


def test_sweep_name_is_content_based(tmp_path):
    base = load_config(None, DEBUG)
    a = load_sweep(None, ["space=sparsity"])
    assert sweep_name(a, base) == sweep_name(load_sweep(None, ["space=sparsity"]), base)   # same -> resumes
    assert sweep_name(a, base) != sweep_name(load_sweep(None, ["space=unroll"]), base)
    assert sweep_name(a, base) != sweep_name(a, load_config(None, {**DEBUG, "train.steps": 7}))
    assert sweep_name(load_sweep(None, ["name=mine"]), base) == "mine"
    assert sweep_name(a, base).startswith("sweep-")


def test_metric_checks_before_any_trial():
    synthetic = load_config(None, {**DEBUG, "data.synthetic": True})
    shards = load_config(None, DEBUG)
    check_metric("train/recon_psnr", "metric", synthetic, None, every_report=True)
    check_metric("eval/psnr", "metric", shards, ["train", "val"], every_report=False)
    check_metric("eval/sparsity/stage4", "metric", shards, ["train", "val"], every_report=False)
    with pytest.raises(ConfigError, match="data.synthetic=true"):
        check_metric("eval/psnr", "metric", synthetic, None, every_report=False)
    with pytest.raises(ConfigError, match="no 'val' split"):
        check_metric("eval/psnr", "metric", shards, ["train"], every_report=False)
    with pytest.raises(ConfigError, match="train.eval_batches=0"):
        check_metric("eval/ssim", "metric", load_config(None, {**DEBUG, "train.eval_batches": 0}), ["train", "val"],
                     every_report=False)
    with pytest.raises(ConfigError, match="asha.metric='eval/psnr' is measured only by the end-of-training"):
        check_metric("eval/psnr", "asha.metric", shards, ["train", "val"], every_report=True)
    with pytest.raises(ConfigError, match="never reported by a trial. Did you mean 'eval/psnr'"):
        check_metric("eval/psrn", "metric", shards, ["train", "val"], every_report=False)
    with pytest.raises(ConfigError, match="sparsity/stage5"):   # the debug model has 4 CSC stages
        check_metric("sparsity/stage5", "metric", shards, ["train", "val"], every_report=True)


class ListReporter:
    def __init__(self) -> None:
        self.reports: list[dict[str, float]] = []

    def metrics(self, step, metrics):
        self.reports.append(dict(metrics))

    def images(self, step, trainer, x):
        pass

    def checkpoint(self, step, state, metrics):
        self.reports.append(dict(metrics))


@pytest.mark.parametrize("mode", ["binary", "multiclass"])
def test_accepted_metric_names_are_those_a_real_trainer_and_evaluation_report(mode):
    """A real CTRL step and a real evaluation pass: their keys must equal the names the sweep
    accepts, so 'a metric trials never report' is caught exactly."""
    from pipeline.evaluate import evaluate_model
    from pipeline.trainer import CTRLTrainer

    cfg = load_config(None, {**DEBUG, "objective.mode": mode, "train.steps": 1, "train.log_every": 1,
                             "train.batch_size_per_worker": 4, "train.image_every": 0,
                             "train.checkpoint_every": 1, "scaling.num_workers": 0})
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    labels = torch.arange(4) % 2

    def batches():
        while True:
            yield x, labels

    reporter = ListReporter()
    trainer = CTRLTrainer(cfg, device=torch.device("cpu"), num_classes=2, batches=batches(), reporter=reporter)
    trainer.fit()
    assert set(reporter.reports[0]) == training_metrics(cfg)
    result = evaluate_model(trainer.raw_encoder, trainer.raw_decoder, [(x, labels)], device=torch.device("cpu"),
                            mode=mode, num_classes=2, eps_sq=cfg.objective.eps_sq,
                            initial_atoms=trainer.initial_atoms)  # as the end-of-training evaluation does
    assert {f"eval/{k}" for k in result.metrics} == evaluation_metrics(cfg)


def test_asha_grace_period():
    spec = load_sweep(None, [])
    assert asha_grace_period(spec, load_config(None, {"train.steps": 400})) == 100   # a quarter by default
    assert asha_grace_period(load_sweep(None, ["asha.grace_period=30"]), load_config(None, {"train.steps": 400})) == 30
    with pytest.raises(ConfigError, match="asha.grace_period=500 exceeds train.steps=400"):
        asha_grace_period(load_sweep(None, ["asha.grace_period=500"]), load_config(None, {"train.steps": 400}))
