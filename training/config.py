"""Run and training configs as dataclasses: ``--key=value`` and recipe files (JSON/YAML, one
section per stage) parsed into them, every value checked against its type hint and the rules
declared here before any data is touched; user errors end in one line that names the key."""
from __future__ import annotations

import dataclasses
import json
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from digit_core.config import ConfigError
from digit_core.presets import PRESETS
from digit_core.typecheck import check_value

STAGES = ("ssl", "features", "kmeans", "vqgan", "stage1", "stage2", "assemble")


# -- configuration ---------------------------------------------------------------------------------
@dataclass
class RunConfig:
    """Fields every stage shares; these may sit at the top level of a config file."""

    root: str = "runs/exp"         # experiment directory; stage X writes <root>/X
    model: str = "tiny"            # preset name (tiny, fmnist, ...) or a DiGIT config.json
    data: str = ""                 # an image folder (<class>/<image>) or "fmnist"
    seed: int = 0
    device: str = "auto"           # auto = this rank's GPU when there is one, else CPU
    batch_size: int = 64           # per process
    workers: int = 2               # data-loader processes per rank
    bf16: bool = True              # bf16 autocast (CPU too: avx512-bf16/AMX matmuls are ~3-8x faster)
    conditional: bool = True       # class-conditional stage 1 (with label dropout for CFG) or not
    codebook_size: int = 0         # K-Means K; 0 = the model config's

    def input(self, value: str, default: str) -> Path:
        """An upstream file: ``value`` when set, else ``<root>/<default>``."""
        return Path(value) if value else Path(self.root) / default


@dataclass
class TrainConfig(RunConfig):
    """Fields of the stages that train a network."""

    steps: int = 1000
    lr: float = 3e-4
    min_lr: float = 0.0            # floor of the cosine schedule
    schedule: str = "inverse_sqrt"  # inverse_sqrt (fairseq, the paper) | cosine | constant
    warmup: int = 100
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.98
    grad_clip: float = 1.0         # 0 = off
    ema: float = 0.0               # EMA decay of the weights; 0 = off
    ckpt_every: int = 500
    log_every: int = 20
    fresh: bool = False            # start over: delete this stage's checkpoint and metrics instead of resuming
    resume_unverified: bool = False  # resume a checkpoint that records no provenance (written before it was recorded)


# -- values: types from the hints, ranges and choices declared here ----------------------------------
Rule = tuple[Callable[[Any], bool], str]   # (accepts the value, the allowed values in words)


def at_least(low: float) -> Rule:
    return (lambda v: v >= low), f">= {low}"


def above(low: float) -> Rule:
    return (lambda v: v > low), f"> {low}"


def fraction(upper_open: bool = False) -> Rule:
    return ((lambda v: 0 <= v < 1), "in [0, 1)") if upper_open else ((lambda v: 0 <= v <= 1), "in [0, 1]")


def one_of(*choices: str) -> Rule:
    return (lambda v: v in choices), "one of " + ", ".join(choices)


def _data_spec(spec: str) -> bool:
    """An image folder that exists, or ``fmnist[:split][@DIR]`` (DIR must exist); "" is unset."""
    from digit_core.data import FMNIST_SPLITS
    if not spec:
        return True
    if spec.startswith("fmnist"):
        name, at, root = spec.partition("@")
        split = name.partition(":")[2] or "train"
        return name.partition(":")[0] == "fmnist" and split in FMNIST_SPLITS and (not at or Path(root).is_dir())
    return Path(spec).is_dir()


DATA_RULE: Rule = (_data_spec, "an existing image folder (<class>/<image> files) or fmnist[:train|fit|val|test][@DIR]")
# Constraints by field name: every config class that has the field gets its rule, the stages'
# own (SSLConfig included) as well as the shared ones. A class may add ``rules: ClassVar[dict]``.
RULES: dict[str, Rule] = {
    "data": DATA_RULE, "val_data": DATA_RULE,
    "model": (lambda v: v in PRESETS or (v.endswith(".json") and Path(v).is_file()),
              f"a preset ({', '.join(PRESETS)}) or an existing config.json"),
    "device": one_of("auto", "cpu", "cuda"),
    "batch_size": at_least(1), "workers": at_least(0), "codebook_size": at_least(0),
    "steps": at_least(1), "lr": above(0), "min_lr": at_least(0), "warmup": at_least(0),
    "schedule": one_of("inverse_sqrt", "cosine", "constant"),
    "weight_decay": at_least(0), "beta1": fraction(upper_open=True), "beta2": fraction(upper_open=True),
    "grad_clip": at_least(0), "ema": fraction(upper_open=True),
    "ckpt_every": at_least(1), "log_every": at_least(1), "eval_every": at_least(1), "eval_batches": at_least(1),
    "eval_images": at_least(1), "probe_every": at_least(0), "label_smoothing": fraction(upper_open=True),
    "fraction": (lambda v: 0 < v <= 1, "in (0, 1]"), "heldout_fraction": fraction(), "patches_per_image": at_least(0),
    "dtype": one_of("float16", "float32"), "niter": at_least(1), "max_points_per_centroid": at_least(1),
    "perceptual": one_of("random", "encoder", "none"), "adv_start": at_least(0), "reset_every": at_least(0),
    "disc_width": at_least(4),
}


def _coerce(text: str, hint: Any, key: str) -> Any:
    """A command-line string (or a string in a config file) as a value of the field's type."""
    try:
        if hint is bool:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return text.lower() in ("1", "true", "yes")
        if hint in (int, float, str):
            return hint(text)
        return json.loads(text)   # tuples, lists
    except ValueError:
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(hint, f"JSON for {hint}")
        raise ConfigError(f"{key}: expected {kind}, got {text!r}") from None


def check_field(cls: type, key: str, value: Any) -> Any:
    """``value`` checked against the type hint of ``cls.key`` and the rule for ``key``; a string
    for a non-string field is parsed as on the command line. Raise ConfigError naming the key."""
    hint = typing.get_type_hints(cls)[key]
    if isinstance(value, str) and hint is not str:
        value = _coerce(value, hint, key)
    try:
        value = check_value(value, hint, key)
    except TypeError as err:
        raise ConfigError(str(err)) from None
    accepts, allowed = (RULES | getattr(cls, "rules", {})).get(key, (None, ""))
    if accepts is not None and not accepts(value):
        raise ConfigError(f"{key} must be {allowed}, got {value!r}")
    return value


def config_help(cls: type) -> str:
    """``--help``: the stage's module docstring, then every field with its default and the
    comment beside it in the dataclass source."""
    import inspect
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            for line in inspect.getsource(klass).splitlines():
                name, _, rest = line.strip().partition(":")
                if "#" in rest and name.isidentifier():
                    comments[name] = rest.partition("#")[2].strip()
    doc = (sys.modules[cls.__module__].__doc__ or "").strip()
    rows = [f"  --{f.name}={json.dumps(f.default) if isinstance(f.default, (tuple, list)) else f.default}"
            + (f"   # {comments[f.name]}" if f.name in comments else "") for f in dataclasses.fields(cls)]
    return f"{doc}\n\noptions (--config FILE, then --key=value overrides):\n" + "\n".join(rows)


def parse_config(cls: type, argv: list[str] | None = None) -> Any:
    """``cls`` from ``--config FILE`` (JSON or YAML) then ``--key=value`` overrides, every value
    checked (type, range, choices; see ``check_field``) before any data is touched.

    A file holds shared keys (``RunConfig`` fields) at the top level and stage-specific keys in
    a section named after the stage (``stage1: {steps: ...}``), so one file drives a whole chain.
    Without ``argv`` this is a command line: user errors (ConfigError, a missing file) then end
    the process with one line instead of a traceback.
    """
    if argv is None:
        sys.excepthook = _one_line_user_errors
        argv = sys.argv[1:]
    if "-h" in argv or "--help" in argv:
        print(config_help(cls))
        sys.exit(0)
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    rest = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--config" or a.startswith("--config="):
            path = a.partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else "")
            i += 0 if "=" in a else 1
            if not path:
                raise ConfigError("--config needs a file: --config FILE")
            read = _read_config_file(Path(path), getattr(cls, "stage", ""), fields)
            values.update(read)
            where.update(dict.fromkeys(read, f"{path}: "))
        else:
            rest.append(a)
        i += 1
    for a in rest:
        key, eq, text = a.removeprefix("--").partition("=")
        key = key.replace("-", "_")
        if a.startswith("--") and not eq and key in fields and typing.get_type_hints(cls)[key] is bool:
            eq, text = "=", "true"    # --fresh is --fresh=true
        if not a.startswith("--") or not eq:
            raise ConfigError(f"arguments are --key=value, got {a!r}")
        if key not in fields:
            raise ConfigError(f"{cls.__name__} has no field {key!r}; fields: {sorted(fields)}")
        values[key], where[key] = text, ""
    checked = {}
    for k, v in values.items():
        try:
            checked[k] = check_field(cls, k, v)
        except ConfigError as err:
            raise ConfigError(f"{where[k]}{err}") from None
    return cls(**checked)


def _one_line_user_errors(kind: type, err: BaseException, tb: Any) -> None:
    """``sys.excepthook`` of the stage CLIs: a user error (a bad value, a missing file) is one
    line on stderr; anything else keeps its traceback."""
    if issubclass(kind, (ConfigError, FileNotFoundError)):
        print(f"error: {err}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, err, tb)


def _load_recipe(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a dict; ``base: other.yaml`` (relative to the file) is read first and
    this file's keys override it, a stage section key by key, so a variant recipe names only
    what it changes."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} is its own base")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml
        d = yaml.safe_load(text) or {}
    else:
        d = json.loads(text)
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a config file holds a mapping, not {type(d).__name__}")
    base = d.pop("base", None)
    if base is None:
        return d
    out = _load_recipe(path.parent / base, seen + (path.resolve(),))
    for k, v in d.items():
        out[k] = (out.get(k) or {}) | v if k in STAGES and isinstance(v, dict) else v
    return out


def _read_config_file(path: Path, stage: str, fields: set[str]) -> dict[str, Any]:
    d = _load_recipe(path)
    shared = {f.name for f in dataclasses.fields(RunConfig)}
    out: dict[str, Any] = {}
    for k, v in d.items():
        if k in STAGES:
            continue
        if k not in shared:
            raise ConfigError(f"{path}: top-level key {k!r} is not shared ({sorted(shared)}); put it under a stage section")
        out[k] = v
    section = d.get(stage) or {}
    unknown = sorted(set(section) - fields)
    if unknown:
        raise ConfigError(f"{path}: section {stage!r} has unknown keys {unknown}")
    return out | section
