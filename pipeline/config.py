"""The experiment configuration: one typed tree of dataclasses.

Precedence: defaults (this file) < model preset (``model.preset``) < YAML file < ``section.key=value``
overrides. An unknown key or a value of the wrong type is an error that names the key and lists the
valid choices; the dialect of values and the typed loader are pipeline/dialect.py, shared with the sweep
and workflow files. The tree becomes a plain dict only at the Ray boundary (``to_dict`` / ``from_dict``).
Ray Tune search spaces are dotted keys applied by the same ``apply_overrides``.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from models.config import ModelConfig
from models.presets import preset_config
from pipeline.dialect import ConfigError, from_dict, load_yaml_text, parse_override
from pipeline.dialect import set_dotted as _set_dotted

# The dialect's other names, re-exported: pipeline.config is where callers find the whole config API.
from pipeline.dialect import YamlLoader as YamlLoader
from pipeline.dialect import coerce_value as coerce_value
from pipeline.dialect import field_types as field_types
from pipeline.dialect import parse_value as parse_value
from pipeline.dialect import unknown_key_error as unknown_key_error

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------


@dataclass
class ObjectiveConfig:
    mode: Literal["binary", "multiclass"] = "binary"
    """'binary': max_f min_g ΔR(Z, Ẑ) (unlabelled); 'multiclass': ΔR(Z|Π) + ΔR(Ẑ|Π) + Σⱼ ΔR(Zⱼ, Ẑⱼ)."""

    eps_sq: float = 0.5
    """ε² of the coding rate (the reference code's EPS = 0.5 is ε² itself)."""

    rate_weight: float = 0.0
    """Weight of the extra R(Z) term (u-CTRL); 0 = off."""

    consistency_weight: float = 0.0
    """λ₂ of the sample-wise consistency Σᵢ (1 − cos(zᵢ, ẑᵢ)), summed over the global batch. A constraint
    that BOTH players minimise (u-CTRL), not a term of the game; pair it with rate_weight > 0 so that the
    encoder cannot satisfy it by becoming blind to the difference of x and x̂. 0 = off."""

    dictionary_weight: float = 0.0
    """Weight of the stage-local dictionary loss Σ_l ‖sg(h_{l−1}) − A_l sg(z_l)‖² / ‖sg(h_{l−1})‖² in the
    encoder's loss (models/dictionary.py eq. 5): the dictionary update of sparse coding, on the stages
    listed in dictionary_stages. Its gradient reaches only those stages' atoms (codes and inputs are
    detached); it is no pixel loss on g(f(x)). 0 = off (atoms move only through the game)."""

    dictionary_stages: tuple[int, ...] = (1,)
    """Encoder stages (1-based; 1 codes the image) whose atoms the dictionary loss learns."""

    num_classes: int = 0
    """Classes k for the multiclass objective; 0 = read from the shard manifest."""

    def __post_init__(self) -> None:
        if self.eps_sq <= 0:
            raise ConfigError(f"objective.eps_sq={self.eps_sq}: must be > 0 (it is ε²)")
        if self.rate_weight < 0 or self.consistency_weight < 0:
            raise ConfigError("objective.rate_weight and objective.consistency_weight must be >= 0")
        if self.num_classes < 0:
            raise ConfigError(f"objective.num_classes={self.num_classes}: must be >= 0")
        if self.dictionary_weight < 0:
            raise ConfigError(f"objective.dictionary_weight={self.dictionary_weight}: must be >= 0")
        if any(s < 1 for s in self.dictionary_stages):
            raise ConfigError(f"objective.dictionary_stages={self.dictionary_stages}: stages are numbered from 1")


@dataclass
class AdamConfig:
    lr: float = 1.5e-4
    """Peak learning rate (docs/method.md §5: 1.5e-4 for both players)."""

    betas: tuple[float, float] = (0.5, 0.999)
    """Adam (β₁, β₂): (0.5, 0.999) for the 32 px labelled setting, (0.0, 0.9) for 48/128 px."""

    weight_decay: float = 0.0

    atom_lr_scale: bool = False
    """Step each 4-d weight (CSC dictionary or convolution filter) of this player at lr × rms(W₀) / 0.02, W₀
    its initial value, and the rest (BatchNorm) at lr. Adam moves each entry by about lr per step whatever
    its size, so a unit-norm atom of C·k² entries (rms 1/√(C·k²): 0.25 for grey 4×4 atoms) turns about
    rms/0.02 times slower than a DCGAN-initialised filter (rms 0.02) at the same lr; with this on, every
    filter turns at the same relative rate. DCGAN-initialised convolutions are unaffected (factor 1)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr}: must be > 0")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas={self.betas}: each must be in [0, 1)")


@dataclass
class OptimConfig:
    encoder: AdamConfig = field(default_factory=AdamConfig)
    """Adam for the encoder f (the maximising player)."""

    decoder: AdamConfig = field(default_factory=AdamConfig)
    """Adam for the decoder g (the minimising player)."""

    schedule: Literal["linear", "constant"] = "linear"
    """Learning-rate schedule: linear decay to 0 at train.steps (docs/method.md §5), or constant."""

    warmup_steps: int = 0
    """Linear warm-up from 0 over this many steps before the schedule."""



@dataclass
class TrainConfig:
    steps: int = 2000
    """CTRL iterations (each: encoder_steps_per_decoder_step encoder steps + one decoder step)."""

    batch_size_per_worker: int = 128
    """Images per worker per step; the global batch is this × scaling.num_workers."""

    encoder_steps_per_decoder_step: int = 1
    """'inner' of docs/method.md §5: encoder steps before each decoder step."""

    precision: Literal["auto", "bf16", "fp32", "tf32", "fp64"] = "auto"
    """Network arithmetic: 'auto' = bf16 autocast on GPU, fp32 on CPU; 'fp64' = float64 networks and
    statistics (numerical checks, e.g. the multi-worker parity test). Logdets are at least fp32."""

    compile: bool = False
    """torch.compile the networks (GPU only; pays off on long runs)."""

    channels_last: bool = True
    """channels_last memory format on GPU."""

    log_every: int = 50
    """Steps between metric reports (the only host-device synchronisation of the loop)."""

    image_every: int = 500
    """Steps between image artifacts (reconstruction grid, dictionary atoms); 0 = only at the end."""

    checkpoint_every: int = 500
    """Steps between checkpoints (one is always written at the end)."""

    eval_batches: int = 8
    """Batches of the evaluation split used at the end of training (0 = skip)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size_per_worker", "encoder_steps_per_decoder_step", "log_every",
                     "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)}: must be >= 1")
        if self.image_every < 0 or self.eval_batches < 0:
            raise ConfigError("train.image_every and train.eval_batches must be >= 0")


@dataclass
class DataConfig:
    shards: str = ""
    """Directory or fsspec URL holding the shards and manifest written by `cscctrl shard`
    ('' = the demo shards, built on first use under run.storage_path)."""

    train_split: str = "train"
    eval_split: str = "val"
    """Split used for evaluation at the end of training ('' = none)."""

    loader_workers: int = 2
    """DataLoader worker processes per training worker."""

    shuffle_buffer: int = 2000
    """Samples in the shuffle buffer of each loader worker."""

    flip: bool = True
    """Random horizontal flips."""

    dequantize: bool = False
    """Add U[0,1)/128 noise after scaling to [-1, 1] (CTRL ImageNet preprocessing)."""

    synthetic: bool = False
    """Random tensors instead of shards (benchmarks and smoke tests)."""

    def __post_init__(self) -> None:
        if self.loader_workers < 0:
            raise ConfigError(f"data.loader_workers={self.loader_workers}: must be >= 0 (0 = load in the training "
                              f"process)")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer={self.shuffle_buffer}: must be >= 1 sample")


@dataclass
class RunConfig:
    name: str = ""
    """Run name; the same name resumes from its last checkpoint. '' = derived from the config's content."""

    storage_path: str = "runs"
    """Where checkpoints and Ray results go: a local path or a shared URL (s3://...)."""

    seed: int = 0
    """Seed; worker r uses seed + r for model and augmentation randomness."""

    def __post_init__(self) -> None:
        check_run_name(self.name)


RUN_NAME_MAX = 200


def check_run_name(name: str, key: str = "run.name") -> None:
    """A run name becomes one folder under run.storage_path and an MLflow tag value: no path separators,
    no '..', no leading dot or dash, no control characters, and not both kinds of quote (an MLflow search
    filter quotes the value with the kind it does not hold)."""
    if not name:
        return
    problem = ""
    if "/" in name or "\\" in name:
        problem = "holds a path separator"
    elif name.startswith((".", "-")):
        problem = "starts with '.' or '-'"
    elif any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        problem = "holds a control character"
    elif "'" in name and '"' in name:
        problem = "holds both ' and \""
    elif len(name) > RUN_NAME_MAX:
        problem = f"is longer than {RUN_NAME_MAX} characters"
    if problem:
        raise ConfigError(f"{key}={name!r} {problem}: a run name is one folder under run.storage_path. Use "
                          f"letters, digits and -_. (e.g. {re.sub(r'[^A-Za-z0-9_.-]+', '-', name).strip('.-')[:60] or 'my-run'!r})")


@dataclass
class TrackingConfig:
    uri: str = ""
    """MLflow tracking URI; '' = $MLFLOW_TRACKING_URI, else a local sqlite store under run.storage_path."""

    experiment: str = "cscctrl"
    registered_model: str = ""
    """Register the final model under this name ('' = log the model without registering it)."""

    alias: str = "latest"
    """Registry alias set on the registered version."""

    log_model: bool = True
    """Log the final encoder/decoder with mlflow.pytorch.log_model."""

    parent_run_id: str = ""
    """MLflow run id of a parent run (a sweep or a workflow); the training run is nested under it."""

    system_metrics_interval_s: float = 5.0
    """Seconds between samples of CPU, memory, disk, network and GPU use (GPU with nvidia-ml-py and a GPU),
    which rank 0 logs as the run's MLflow system metrics (system/…, pipeline/system_metrics.py); 0 = none."""

    command: str = ""
    """The command line that started the run, shown in the run's MLflow description. Filled in by the
    launcher (`cscctrl train`, `tune`, `run`, `demo`) when empty; credentials in URLs are removed."""

    def __post_init__(self) -> None:
        if self.system_metrics_interval_s < 0:
            raise ConfigError(f"tracking.system_metrics_interval_s={self.system_metrics_interval_s}: must be >= 0 "
                              f"(0 = no system metrics)")


@dataclass
class ScalingConfig:
    num_workers: int = 1
    """Ray Train workers (one per GPU on GPU clusters). 0 = run the loop in this process without Ray."""

    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    """GPUs per worker when use_gpu (fractions allowed for sweeps)."""

    max_failures: int = 2
    """Worker-group restarts from the last checkpoint before the run fails."""

    keep_checkpoints: int = 2
    """Checkpoints kept in storage (the newest)."""

    sync_batchnorm: bool = True
    """BatchNorm statistics over the global batch (needed for exact multi-worker parity). Costs nothing
    measurable on 2 H200s (pipeline/distributed.py: fused kernels, no host syncs); False = per-worker
    moments, for comparison only."""

    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers: STRICT_PACK keeps a run on one node (e.g. all 8 GPUs of one machine)."""

    accelerator_type: str = ""
    """Ray accelerator type every worker must run on (e.g. H100, A100); '' = any."""

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"scaling.num_workers={self.num_workers}: must be >= 0")
        if self.cpus_per_worker < 0:
            raise ConfigError(f"scaling.cpus_per_worker={self.cpus_per_worker}: must be >= 0")
        if self.gpus_per_worker <= 0:
            raise ConfigError(f"scaling.gpus_per_worker={self.gpus_per_worker}: must be > 0 (fractions share a GPU)")
        if self.max_failures < -1:
            raise ConfigError(f"scaling.max_failures={self.max_failures}: must be >= 0, or -1 to retry forever")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"scaling.keep_checkpoints={self.keep_checkpoints}: must be >= 1")


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)

    def __post_init__(self) -> None:
        objective, model = self.objective, self.model
        if objective.dictionary_weight:
            if model.layer != "csc":
                raise ConfigError(f"objective.dictionary_weight={objective.dictionary_weight} learns CSC "
                                  f"dictionaries, but model.layer={model.layer!r} has none; set it to 0 for the "
                                  f"plain-convolution baseline")
            bad = [s for s in objective.dictionary_stages if s > model.num_stages]
            if bad:
                raise ConfigError(f"objective.dictionary_stages={objective.dictionary_stages}: the model has "
                                  f"{model.num_stages} stages (image_size={model.image_size}), no stage {bad[0]}")

    @property
    def global_batch_size(self) -> int:
        return self.train.batch_size_per_worker * max(1, self.scaling.num_workers)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        return from_dict(cls, d)


# ----------------------------------------------------------------------------------------------
# Dict round trip and type checking
# ----------------------------------------------------------------------------------------------


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict of builtins (tuples become lists, as YAML and JSON hold them)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------------------------
# Merging: presets, YAML files, overrides
# ----------------------------------------------------------------------------------------------


def set_dotted(tree: dict[str, Any], key: str, value: Any, root: type | None = None) -> None:
    """Set ``tree['a']['b']['c'] = value`` for key 'a.b.c', checking that every part is a real path of
    the dataclass ``root`` (default ExperimentConfig); pipeline/dialect.py."""
    _set_dotted(tree, key, value, root or ExperimentConfig)


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_named_file(path: str | Path, folder: Path, kind: str) -> Path:
    """A file path, or the bare name of a YAML file in ``folder`` ('imagenet128' -> folder/imagenet128.yaml);
    otherwise an error listing the bundled ones."""
    p = Path(path)
    if p.exists():
        return p
    for candidate in (folder / p, folder / f"{p}.yaml"):
        if candidate.exists():
            return candidate
    available = sorted(q.stem for q in folder.glob("*.yaml"))
    raise ConfigError(f"{kind} file {str(path)!r} not found (bundled {kind}s: {', '.join(available) or 'none'})")


def resolve_config_path(path: str | Path) -> Path:
    """A config file path, or a bare name of a file in configs/ ('imagenet128' -> configs/imagenet128.yaml)."""
    return resolve_named_file(path, CONFIG_DIR, "config")


def read_yaml_file(p: Path, kind: str = "config") -> Any:
    """The YAML document in ``p``; a file that cannot be read or parsed is a ConfigError naming it (and the
    line of a syntax error)."""
    try:
        text = p.read_text()
    except UnicodeDecodeError as e:
        raise ConfigError(f"{kind} file {p} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise ConfigError(f"{kind} file {p} cannot be read: {e.strerror or e}") from e
    try:
        return load_yaml_text(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{kind} file {p} is not valid YAML{where}: {problem}") from e


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = resolve_config_path(path)
    data = read_yaml_file(p) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of sections at the top level")
    return data


def apply_overrides(tree: dict[str, Any], overrides: dict[str, Any] | list[str],
                    root: type | None = None) -> dict[str, Any]:
    """Apply dotted-key overrides to a plain config dict (a copy is returned). Accepts CLI strings
    ('a.b=1') or a mapping {'a.b': 1} (a Ray Tune sample). Every key must be a real path of the dataclass
    ``root`` (default ExperimentConfig)."""
    tree = copy.deepcopy(tree)
    items = [parse_override(o) for o in overrides] if isinstance(overrides, list) else overrides.items()
    for key, value in items:
        set_dotted(tree, key, value, root)
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None,
                base: dict[str, Any] | None = None) -> ExperimentConfig:
    """defaults < ``base`` dict < model preset < YAML file < overrides -> a checked ExperimentConfig."""
    tree: dict[str, Any] = dict(base or {})
    if path:
        tree = _deep_merge(tree, read_yaml(path))
    tree = apply_overrides(tree, overrides or {})
    preset = tree.get("model", {}).get("preset")
    if preset:
        tree["model"] = _deep_merge(to_dict(preset_config(preset)), tree["model"])
    return ExperimentConfig.from_dict(tree)


def diff_from_defaults(cfg: ExperimentConfig) -> dict[str, Any]:
    """The nested dict of values that differ from the defaults (what a YAML file should hold)."""

    def diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in a.items():
            if isinstance(v, dict):
                sub = diff(v, b[k])
                if sub:
                    out[k] = sub
            elif v != b[k]:
                out[k] = v
        return out

    return diff(cfg.to_dict(), ExperimentConfig().to_dict())


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {'a.b.c': value} (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def dump_yaml(cfg: ExperimentConfig, only_diff: bool = False) -> str:
    data = diff_from_defaults(cfg) if only_diff else cfg.to_dict()
    return yaml.safe_dump(data, sort_keys=False)
