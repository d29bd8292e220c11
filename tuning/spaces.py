"""Search spaces: dotted config keys mapped to distributions (docs/method.md §6: what a sweep varies).

A space is a mapping ``{"section.key": spec}`` whose keys are the same dotted paths the CLI overrides
use; every sampled point is applied to the base config by ``pipeline.config.apply_overrides``, so a
swept name is checked to be a real config path exactly as ``cscctrl train key=value`` checks it.

A spec is a one-key mapping (the YAML form):

    {grid: [v1, v2, ...]}        every value, crossed with the other grid keys
    {choice: [v1, v2, ...]}      one value drawn uniformly
    {uniform: [lo, hi]}          float drawn uniformly from [lo, hi]
    {loguniform: [lo, hi]}       float whose log is uniform on [log lo, log hi]; 0 < lo
    {randint: [lo, hi]}          integer drawn uniformly from lo, lo+1, ..., hi-1 (hi exclusive)
    {each: spec}                 a tuple-valued key (model.lam_per_stage): one independent draw of
    {each: [spec1, spec2, ...]}  spec per element, or one spec per element

``each`` turns one key into one Tune parameter per element, named ``key:i`` (a name MLflow and Optuna
accept); the sweep driver reassembles the tuple before applying it. Values that are not scalars (the
Adam betas pair) travel through Tune and Optuna as their literal text ("[0.5, 0.999]") and are parsed
back with the CLI's own parser, since Optuna's categorical parameters hold only scalars.

λ: ``model.lam`` is the global sparsity weight (stage 2 gets ``model.stage2_lam_scale`` times it); an
explicit ``model.lam_per_stage`` replaces it, so a space that sweeps ``model.lam`` over a base with a
per-stage λ is refused (every trial would train with the same λ).

Named presets are functions returning a space in this form; ``resolve_space`` accepts a preset name,
a list of names (their union), or a mapping.
"""
from __future__ import annotations

import copy
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.config import ConfigError, ExperimentConfig, apply_overrides, parse_override

Kind = Literal["grid", "choice", "uniform", "loguniform", "randint"]
KINDS: tuple[str, ...] = typing.get_args(Kind)
DISCRETE_KINDS = ("grid", "choice")

# Sections a space may not sweep: the sweep owns them (run names, MLflow parent, per-trial resources).
RESERVED_SECTIONS = ("run", "tracking", "scaling")
# Keys a space may not sweep, with the reason shown to the user.
RESERVED_KEYS = {
    "model.preset": "a preset is resolved once, into the base config; sweep the model.* keys it sets instead",
}

LAMBDA_LEVELS = [0.0, 0.01, 0.05, 0.1, 0.2, 0.5]  # λ per layer, docs/method.md §6
UNROLL_STEPS = [1, 2, 3, 5]                       # unrolled proximal-gradient steps n, docs/method.md §6


class SpaceError(ConfigError):
    """A bad search-space definition; the message names the key and what was expected."""


@dataclass(frozen=True)
class Dimension:
    """One searched parameter: ``kind`` with ``values`` (grid/choice) or ``bounds`` (the ranges).

    ``key`` is the Tune parameter name: the dotted config path, or ``path:i`` for element i of a
    tuple-valued key swept with ``each``.
    """

    key: str
    kind: Kind
    values: tuple[Any, ...] = ()
    bounds: tuple[float, float] = (0.0, 0.0)

    @property
    def path(self) -> str:
        """The config path this dimension sets (``model.lam_per_stage`` for ``model.lam_per_stage:1``)."""
        return self.key.split(":", 1)[0]

    @property
    def index(self) -> int | None:
        return int(self.key.split(":", 1)[1]) if ":" in self.key else None

    @property
    def discrete(self) -> bool:
        return self.kind in DISCRETE_KINDS

    def probe_values(self) -> list[Any]:
        """Values that stand for the whole dimension when checking it against the config: every listed
        value, or both ends of a range (the largest integer for randint, whose upper end is excluded)."""
        if self.discrete:
            return list(self.values)
        lo, hi = self.bounds
        if self.kind == "randint":
            return [int(lo), int(hi) - 1]
        return [float(lo), float(hi)]

    def describe(self) -> str:
        if self.discrete:
            return f"{self.kind} {list(self.values)}"
        return f"{self.kind} [{self.bounds[0]:g}, {self.bounds[1]:g}]"


# ----------------------------------------------------------------------------------------------
# Parsing the YAML form
# ----------------------------------------------------------------------------------------------


def _parse_spec(key: str, spec: Any) -> Dimension:
    """One spec mapping -> a Dimension, checking its shape (not yet its values against the config)."""
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise SpaceError(
            f"search space key '{key}': expected a mapping with exactly one of {', '.join(KINDS)} "
            f"(e.g. {{grid: [0.0, 0.1]}}), got {spec!r}")
    (kind, arg), = spec.items()
    if kind not in KINDS:
        raise SpaceError(f"search space key '{key}': unknown distribution '{kind}'; expected one of "
                         f"{', '.join(KINDS)}, or each")
    if not isinstance(arg, (list, tuple)):
        raise SpaceError(f"search space key '{key}': {kind} takes a list, got {arg!r}")
    if kind in DISCRETE_KINDS:
        if len(arg) == 0:
            raise SpaceError(f"search space key '{key}': {kind} has an empty list of values")
        values = tuple(tuple(v) if isinstance(v, list) else v for v in arg)
        if len(set(map(repr, values))) != len(values):
            raise SpaceError(f"search space key '{key}': {kind} lists a value twice: {list(arg)}")
        return Dimension(key, kind, values=values)
    if len(arg) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in arg):
        raise SpaceError(f"search space key '{key}': {kind} takes [low, high] as two numbers, got {list(arg)}")
    lo, hi = float(arg[0]), float(arg[1])
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise SpaceError(f"search space key '{key}': {kind} bounds must be finite, got {list(arg)}")
    if kind == "randint":
        if not all(isinstance(v, int) for v in arg):
            raise SpaceError(f"search space key '{key}': randint takes integer bounds, got {list(arg)}")
        if hi - lo < 1:
            raise SpaceError(f"search space key '{key}': randint [{arg[0]}, {arg[1]}) is empty "
                             f"(the upper bound is excluded: need high >= low + 1)")
    elif not lo < hi:
        raise SpaceError(f"search space key '{key}': {kind} [{arg[0]}, {arg[1]}] is empty; need low < high")
    if kind == "loguniform" and lo <= 0:
        raise SpaceError(f"search space key '{key}': loguniform needs 0 < low (log of {arg[0]} is undefined); "
                         f"use uniform, or grid with an explicit 0")
    return Dimension(key, kind, bounds=(lo, hi))


def parse_space(raw: Mapping[str, Any], base: ExperimentConfig | None = None) -> list[Dimension]:
    """The YAML form -> dimensions, checking every key and every value against the config.

    ``base`` is the resolved base config the points are applied to; it supplies the element count of
    ``each`` keys (model.lam_per_stage has ``base.model.num_stages`` elements). Raises SpaceError,
    naming the key, for: unknown or reserved keys, malformed or empty specs, and values the config
    rejects (wrong type, out of range) — all before any trial starts.
    """
    if not isinstance(raw, Mapping):
        raise SpaceError(f"a search space is a mapping of dotted config keys to specs, got {raw!r}")
    if not raw:
        raise SpaceError("the search space is empty: give at least one key (or a preset name: "
                         f"{', '.join(PRESETS)})")
    base = base or ExperimentConfig()
    tree = base.to_dict()
    dims: list[Dimension] = []
    for key, spec in raw.items():
        _check_key(key, tree)
        if isinstance(spec, Mapping) and set(spec) == {"each"}:
            dims.extend(_parse_each(key, spec["each"], base))
        else:
            dims.append(_parse_spec(key, spec))
    for dim in dims:
        _check_values(dim, tree, base)
    _check_lam_is_used(dims, base)
    return dims


def _check_lam_is_used(dims: Sequence[Dimension], base: ExperimentConfig) -> None:
    """A per-stage λ replaces model.lam (models/config.py stage_lams), so sweeping model.lam over a base
    with one would train every trial with the same λ."""
    paths = {d.path for d in dims}
    if "model.lam" in paths and "model.lam_per_stage" not in paths and base.model.lam_per_stage:
        source = f" (from model.preset={base.model.preset})" if base.model.preset else ""
        raise SpaceError(
            f"search space key 'model.lam' would change nothing: the base config sets model.lam_per_stage="
            f"{list(base.model.lam_per_stage)}{source}, which replaces model.lam. Sweep model.lam_per_stage "
            f"instead (e.g. {{each: {{choice: [...]}}}}), or add model.lam_per_stage: [] to base")


def _check_key(key: str, tree: dict[str, Any]) -> None:
    if not isinstance(key, str) or "." not in key:
        raise SpaceError(f"search space key {key!r} is not a dotted config path (section.key, e.g. model.lam)")
    if key.split(".", 1)[0] in RESERVED_SECTIONS:
        raise SpaceError(f"search space key '{key}': the {key.split('.', 1)[0]}.* section is set by the sweep "
                         f"itself (run names, MLflow parent, per-trial resources) and cannot be searched; "
                         f"per-trial resources go under 'resources:' in the sweep file")
    if key in RESERVED_KEYS:
        raise SpaceError(f"search space key '{key}' cannot be searched: {RESERVED_KEYS[key]}")
    try:
        apply_point(tree, {key: None})  # the path check of the CLI (the value is checked later)
    except ConfigError as e:
        raise SpaceError(f"search space: {e}") from None


def _tuple_length(key: str, base: ExperimentConfig) -> int:
    """Element count of a tuple-valued key: fixed by its annotation, or by the architecture."""
    if key == "model.lam_per_stage":
        return base.model.num_stages
    section, *rest = key.split(".")
    cls: Any = type(getattr(base, section))
    for part in rest[:-1]:
        cls = typing.get_type_hints(cls)[part]
    tp = typing.get_type_hints(cls)[rest[-1]]
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and args and args[-1] is not Ellipsis:
        return len(args)
    raise SpaceError(f"search space key '{key}': 'each' needs a tuple-valued key of known length "
                     f"(model.lam_per_stage, optim.encoder.betas, ...); {key} is {tp}")


def _parse_each(key: str, inner: Any, base: ExperimentConfig) -> list[Dimension]:
    n = _tuple_length(key, base)
    specs = list(inner) if isinstance(inner, (list, tuple)) else [inner] * n
    if len(specs) != n:
        raise SpaceError(f"search space key '{key}': 'each' lists {len(specs)} specs but the key has {n} "
                         f"elements{' (CSC stages of the base model)' if key == 'model.lam_per_stage' else ''}")
    return [_parse_spec(f"{key}:{i}", s) for i, s in enumerate(specs)]


def _check_values(dim: Dimension, tree: dict[str, Any], base: ExperimentConfig) -> None:
    """Every listed value (or both ends of a range) must give a valid ExperimentConfig."""
    for value in dim.probe_values():
        if dim.index is not None:
            current = list(getattr_path(base, dim.path))
            if len(current) != _tuple_length(dim.path, base):
                current = [value] * _tuple_length(dim.path, base)
            current[dim.index] = value
            value = tuple(current)
        try:
            ExperimentConfig.from_dict(apply_point(tree, {dim.path: value}))
        except ConfigError as e:
            raise SpaceError(f"search space key '{dim.key}' ({dim.describe()}): the value {value!r} is "
                             f"rejected by the config: {e}") from None


def apply_point(tree: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``apply_overrides`` on a deep copy: the base tree is shared by every point and must not change
    (apply_overrides copies only the top level of the tree it is given)."""
    return apply_overrides(copy.deepcopy(tree), dict(overrides))


def getattr_path(cfg: Any, path: str) -> Any:
    """``getattr_path(cfg, 'optim.encoder.lr')`` -> cfg.optim.encoder.lr."""
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


# ----------------------------------------------------------------------------------------------
# Ray Tune's view, and back
# ----------------------------------------------------------------------------------------------


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


def encode_value(v: Any) -> Any:
    """Scalars travel as themselves; tuples/lists as their literal text (Optuna holds only scalars)."""
    return v if _is_scalar(v) else repr(list(v))


def to_param_space(dims: Sequence[Dimension], search: str) -> dict[str, Any]:
    """Dimensions -> Tune's ``param_space`` for the search algorithm.

    - ``grid``: every dimension must be discrete; all become ``tune.grid_search`` (the full product).
    - ``random``: grid keys are crossed (``tune.grid_search``), the rest sampled ``num_samples`` times.
    - ``optuna``: Optuna proposes every value (grid keys become categorical; Optuna has no grid).
    """
    from ray import tune

    if search == "grid":
        continuous = [d.key for d in dims if not d.discrete]
        if continuous:
            raise SpaceError(f"search: grid needs every key to be a grid or a choice; "
                             f"{', '.join(continuous)} {'is a range' if len(continuous) == 1 else 'are ranges'}"
                             f" (use search: random or optuna for ranges)")
    space: dict[str, Any] = {}
    for d in dims:
        if d.discrete:
            values = [encode_value(v) for v in d.values]
            grid = search == "grid" or (search == "random" and d.kind == "grid")
            space[d.key] = tune.grid_search(values) if grid else tune.choice(values)
        elif d.kind == "uniform":
            space[d.key] = tune.uniform(*d.bounds)
        elif d.kind == "loguniform":
            space[d.key] = tune.loguniform(*d.bounds)
        else:
            space[d.key] = tune.randint(int(d.bounds[0]), int(d.bounds[1]))
    return space


def grid_size(dims: Sequence[Dimension], search: str) -> int:
    """How many trials one repeat of the space makes: the product of the crossed grid keys (1 for
    optuna, which draws points one at a time)."""
    if search == "optuna":
        return 1
    crossed = [d for d in dims if d.discrete and (search == "grid" or d.kind == "grid")]
    return math.prod(len(d.values) for d in crossed)


def decode_trial(config: Mapping[str, Any], dims: Sequence[Dimension]) -> dict[str, Any]:
    """A trial's sampled ``config`` -> ``{dimension key: value}``, literal texts parsed back."""
    out: dict[str, Any] = {}
    for d in dims:
        if d.key not in config:
            raise SpaceError(f"trial config has no value for '{d.key}' (keys: {', '.join(config)})")
        value = config[d.key]
        if isinstance(value, str) and d.discrete and not all(isinstance(v, str) for v in d.values):
            value = parse_override(f"{d.key}={value}")[1]
        out[d.key] = tuple(value) if isinstance(value, list) else value
    return out


def overrides_from_trial(config: Mapping[str, Any], dims: Sequence[Dimension]) -> dict[str, Any]:
    """A trial's sampled ``config`` -> ``{dotted path: value}`` for ``apply_overrides``: literal texts
    parsed back, ``key:i`` elements reassembled into the tuple of ``key``."""
    decoded = decode_trial(config, dims)
    out: dict[str, Any] = {}
    elements: dict[str, dict[int, Any]] = {}
    for d in dims:
        value = decoded[d.key]
        if d.index is None:
            out[d.path] = value
        else:
            elements.setdefault(d.path, {})[d.index] = value
    for path, parts in elements.items():
        out[path] = tuple(parts[i] for i in sorted(parts))
    return out


# ----------------------------------------------------------------------------------------------
# Named presets (functions, so each is a fresh mapping)
# ----------------------------------------------------------------------------------------------


def sparsity() -> dict[str, Any]:
    """The global λ over the levels of docs/method.md §6 (stage 2 keeps its model.stage2_lam_scale)."""
    return {"model.lam": {"grid": list(LAMBDA_LEVELS)}}


def sparsity_per_stage() -> dict[str, Any]:
    """An independent λ per CSC stage (one Tune parameter per stage of the base architecture)."""
    return {"model.lam_per_stage": {"each": {"choice": list(LAMBDA_LEVELS)}}}


def unroll() -> dict[str, Any]:
    """Unrolled steps n and the solver (FISTA momentum matters from n = 3 on)."""
    return {"model.n_steps": {"grid": list(UNROLL_STEPS)}, "model.solver": {"grid": ["fista", "ista"]}}


def sparsity_unroll() -> dict[str, Any]:
    """λ × n: the reconstruction-versus-sparsity trade-off against the unrolling depth."""
    return {"model.lam": {"grid": list(LAMBDA_LEVELS)}, "model.n_steps": {"grid": list(UNROLL_STEPS)}}


def dictionaries() -> dict[str, Any]:
    """Non-negative codes, and tied versus separate decoder dictionaries."""
    return {"model.nonneg": {"grid": [True, False]},
            "model.decoder_dictionaries": {"grid": ["separate", "tied"]}}


def architecture() -> dict[str, Any]:
    """Width ndf of the first stage and feature dimension d."""
    return {"model.ndf": {"choice": [32, 64, 128]}, "model.nz": {"choice": [128, 256, 512]}}


def optimization() -> dict[str, Any]:
    """ε², both learning rates and Adam betas, inner encoder steps and the batch size."""
    return {
        "objective.eps_sq": {"loguniform": [0.1, 1.0]},
        "optim.encoder.lr": {"loguniform": [1e-5, 1e-3]},
        "optim.decoder.lr": {"loguniform": [1e-5, 1e-3]},
        "optim.encoder.betas": {"choice": [[0.5, 0.999], [0.0, 0.9]]},
        "optim.decoder.betas": {"choice": [[0.5, 0.999], [0.0, 0.9]]},
        "train.encoder_steps_per_decoder_step": {"choice": [1, 2]},
        "train.batch_size_per_worker": {"choice": [64, 128, 256]},
    }


def fidelity() -> dict[str, Any]:
    """The terms that make reconstructions sample-faithful and stage 1 a sparse code (docs/method.md §2.2,
    §5): the sample-wise weight λ₂, + R(Z) for the encoder, and the stage-local dictionary loss."""
    return {"objective.consistency_weight": {"grid": [0.0, 0.003, 0.01, 0.03]},
            "objective.rate_weight": {"grid": [0.0, 1.0]},
            "objective.dictionary_weight": {"grid": [0.0, 1.0]}}


def full() -> dict[str, Any]:
    """Everything docs/method.md §6 lists, with λ and n as choices (meant for search: optuna)."""
    space: dict[str, Any] = {"model.lam": {"choice": list(LAMBDA_LEVELS)},
                             "model.n_steps": {"choice": list(UNROLL_STEPS)},
                             "model.solver": {"choice": ["fista", "ista"]}}
    for preset in (dictionaries, architecture, optimization, fidelity):
        space.update({k: {"choice": v["grid"]} if "grid" in v else v for k, v in preset().items()})
    return space


PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    f.__name__: f for f in (sparsity, sparsity_per_stage, unroll, sparsity_unroll, dictionaries, architecture,
                            optimization, fidelity, full)
}


def resolve_space(ref: str | Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """A preset name, a list of preset names (their union: a key may appear in only one), or a mapping
    in the YAML form -> the YAML form."""
    if isinstance(ref, Mapping):
        return dict(ref)
    names = [ref] if isinstance(ref, str) else list(ref)
    if not names:
        raise SpaceError(f"space: an empty list of presets; choose from {', '.join(PRESETS)}")
    space: dict[str, Any] = {}
    for name in names:
        if name not in PRESETS:
            raise SpaceError(f"unknown search space preset {name!r}; choose from {', '.join(PRESETS)}, or give "
                             f"a mapping of dotted config keys to specs")
        for key, spec in PRESETS[name]().items():
            if key in space:
                raise SpaceError(f"space presets {names} both set '{key}'; combine presets that do not overlap")
            space[key] = spec
    return space


def describe_space(dims: Sequence[Dimension]) -> dict[str, str]:
    """``{key: 'grid [0.0, 0.1]'}`` for logs and MLflow params."""
    return {d.key: d.describe() for d in dims}
