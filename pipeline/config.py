"""The experiment configuration: one typed tree of dataclasses.

Precedence: defaults (this file) < model preset (``model.preset``) < YAML file < ``section.key=value``
overrides. An unknown key or a value of the wrong type is an error that names the key and lists the
valid choices. The tree becomes a plain dict only at the Ray boundary (``to_dict`` / ``from_dict``).
Ray Tune search spaces are dotted keys applied by the same ``apply_overrides``.
"""
from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from models.config import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A bad key, type or value in the configuration; the message names the key."""


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


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type annotation of every field of dataclass ``cls``."""
    return typing.get_type_hints(cls)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def unknown_key_error(path: str, key: str, cls: type) -> ConfigError:
    """The error for a key that ``cls`` does not have: names it, suggests the nearest, lists the valid ones."""
    valid = _field_names(cls)
    near = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{near[0]}'?" if near else ""
    where = f"'{path}.{key}'" if path else f"'{key}'"
    return ConfigError(f"unknown config key {where}.{hint} Valid keys{' in ' + path if path else ''}: "
                       f"{', '.join(valid)}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def coerce_value(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; convert the few lossless cases (int -> float,
    list -> tuple). Anything else raises a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is dict:  # a free-form mapping (e.g. the workflow's source_options); its values as annotated
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping; got {value!r}")
        return {k: coerce_value(v, typing.get_args(tp)[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' is a section; expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be {_type_name(tp)}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None) and value is None:
                return None
            try:
                return coerce_value(value, arm, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': {value!r} matches none of {tp}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list; got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"config key '{key}' must have {len(args)} values; got {list(value)!r}")
        return tuple(coerce_value(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number; got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be a finite number; got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer; got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false; got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string; got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported annotation {tp}")


def from_dict(cls: type, d: dict[str, Any], path: str = "") -> Any:
    """Plain dict -> dataclass ``cls``, type-checked; unknown keys raise. Missing keys keep defaults."""
    hints = field_types(cls)
    kwargs = {}
    for key, value in d.items():
        if key not in hints:
            raise unknown_key_error(path, key, cls)
        kwargs[key] = coerce_value(value, hints[key], f"{path}.{key}" if path else key)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{path or 'config'}: {e}") from e


# ----------------------------------------------------------------------------------------------
# Merging: presets, YAML files, overrides
# ----------------------------------------------------------------------------------------------


def parse_override(item: str) -> tuple[str, Any]:
    """'optim.encoder.lr=3e-4' -> ('optim.encoder.lr', 3e-4). Values are Python/YAML literals; anything
    that is not one (a bare word, a path) is taken as a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    raw = raw.strip()
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        lowered = raw.lower()
        value = {"true": True, "false": False, "none": None, "null": None}.get(lowered, raw)
    return key, value


def set_dotted(tree: dict[str, Any], key: str, value: Any, root: type | None = None) -> None:
    """Set ``tree['a']['b']['c'] = value`` for key 'a.b.c', checking that every part is a real path of
    the dataclass ``root`` (default ExperimentConfig)."""
    parts = key.split(".")
    cls: Any = root or ExperimentConfig
    node = tree
    for i, part in enumerate(parts):
        hints = field_types(cls)
        if part not in hints:
            raise unknown_key_error(".".join(parts[:i]), part, cls)
        tp = _optional_section(hints[part])
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(hints[part]):  # an optional section may be set whole (sweep=null)
                raise ConfigError(f"config key '{key}' is a section, not a value; set one of its keys: "
                                  f"{', '.join(_field_names(tp))}")
            node[part] = value
            return
        if typing.get_origin(tp) is dict:  # a free-form mapping: the rest of the key is its nested keys
            for sub in parts[i:-1]:
                if not isinstance(node.get(sub), dict):
                    node[sub] = {}
                node = node[sub]
            node[parts[-1]] = value
            return
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"config key '{'.'.join(parts[:i + 1])}' is a value, not a section")
        if node.get(part) is None:  # an optional section that is null (or absent) starts empty
            node[part] = {}
        node = node[part]
        cls = tp


def _optional_section(tp: Any) -> Any:
    """``X | None`` -> X when X is a dataclass (an optional section); any other annotation as it is."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(arms) == 1 and dataclasses.is_dataclass(arms[0]):
            return arms[0]
    return tp


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


class YamlLoader(yaml.SafeLoader):
    """Safe YAML (plain data only) with YAML 1.2 floats: PyYAML follows YAML 1.1, where 1e-4 (no dot) is
    read as a string."""


YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))


def load_yaml_text(text: str) -> Any:
    return yaml.load(text, Loader=YamlLoader)


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


def apply_overrides(tree: dict[str, Any], overrides: dict[str, Any] | list[str]) -> dict[str, Any]:
    """Apply dotted-key overrides to a plain config dict (a copy is returned). Accepts CLI strings
    ('a.b=1') or a mapping {'a.b': 1} (a Ray Tune sample). Every key must be a real config path."""
    tree = copy.deepcopy(tree)
    items = [parse_override(o) for o in overrides] if isinstance(overrides, list) else overrides.items()
    for key, value in items:
        set_dotted(tree, key, value)
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
        from models.presets import preset_config  # a preset fills the model section under the file
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
