"""Sweeps: which jobs to run, from command-line flags, a TOML file or a named preset.

A sweep is methods x tasks x models x training-set sizes x seeds, each circuit evaluated at a
grid of sparsities. Its keys (the same in a TOML file and, where a flag exists, on the command
line):

==================  ===========================  ==================================================
key                 flag                         meaning
==================  ===========================  ==================================================
methods             --methods ep,acdc,eap        registered method names
tasks               --task gt,ioi                task names
models              --model SPEC[,SPEC]          model specs (default ``smollm2-135m``; a task with a
                                                 ``default_model``, like Tracr's, gets that one)
sparsities          --sparsities 0.9,0.95        target sparsities, each in [0, 1); a list, or
                    --sparsities 0.9:0.99:0.01   a range ``start:stop:step`` (stop included), or
                    --sparsities mib             ``mib``: MIB's circuit sizes (`MIB_SPARSITIES`)
n_train             --n-train 200,400            training-set sizes (default: the task's own)
n_validation        --n-validation N             validation-set size (default: the task's own)
seeds               --seeds 0,1                  method seeds (default 0)
data_seed           --data-seed N                seed of the task's data (default 0)
method_preset       --method-preset NAME         which preset of every method (paper/quick/smoke)
method_config       --set ep.steps=100           per-method hyperparameter overrides
                                                 (TOML: ``[method_config.ep]`` with ``steps = 100``)
per_method          (file only)                  seeds and training-set sizes of one method, over
                                                 the sweep's (``[per_method.acdc]`` with
                                                 ``n_train = [16]``; ``[per_method.eap]`` with
                                                 ``seeds = [0]``)
cut                 --cut effective|edges        how a score method's ranking becomes a circuit at a
                                                 sparsity: the top edges until 1 - sparsity of the
                                                 graph's edges are *effective* (on an input -> logits
                                                 path; default), or the top ``edges``
eval_limit          --eval-limit N               evaluate on the first N test examples (default all)
eval_batch_size     --eval-batch-size N          evaluation batch size (default 32)
device, dtype       --device, --dtype            where (default auto: a GPU when there is one) and in
                                                 which precision (default float32) jobs run
jobs, backend       --jobs N, --backend B        how jobs are executed (see `circuitbench.runner`)
results             --results DIR                the results folder
description         (file only)                  one line saying what the sweep is for
==================  ===========================  ==================================================

A TOML file may also hold per-task tables, ``[task.NAME]``, with any of methods, models,
sparsities, n_train, n_validation, seeds, eval_limit and method_config: they apply to that task
only (the paper's sparsity grids differ per task). Unknown keys are an error.

Sources are layered: built-in defaults, then the preset (``configs/NAME.toml``), then
``--config FILE``, then the flags; for each task a later source wins, and within one source a
per-task value wins over the file's top level. ``method_config`` entries merge field by field in
the same order.

Presets: one precedence. The names paper, quick and smoke exist at two levels: a *sweep preset*
(``--preset NAME``: ``configs/NAME.toml``, or the case study's own, `circuitbench.casestudy`) says
what to run, and a *method preset* (``method_preset``, `CircuitMethod.presets`) is a method's own
budget. A sweep preset picks the method presets of its name unless it sets ``method_preset``. A
method's hyperparameters are resolved, later winning::

    the method's Config defaults
    < its preset ``method_preset`` (with the preset's per-task entries)
    < [method_config] of the sweep preset (configs/NAME.toml, or the case study's preset)
    < [method_config] of --config FILE
    < --set METHOD.FIELD=VALUE

An override is never silent: `Sweep.override_lines` names every field a sweep source changes
from the method's preset (value before and after, and the source), and the runner prints those
lines with the plan (``overrides:``), as it prints the sources in effect (``settings:``).

Expansion: for every task, model, method, n_train and seed, the method splits the sparsities into
jobs (`CircuitMethod.target_groups`): a method that trains one circuit per target (``produces ==
"circuits"``) gets one job per sparsity, unless it trains them all in one run (Edge Pruning's
``schedule = "path"``: one job for the whole grid); a score-based method gets one job that is
discovered once and cut at every sparsity. A job's id is a hash of everything that
defines its result (`JobSpec.config`), so rerunning a sweep finds the jobs it already has.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
PRESETS = ("smoke", "quick", "paper")
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_SPARSITIES = (0.9, 0.95, 0.97, 0.98, 0.99)
# MIB's circuit-track sizes (`circuitbench.metrics.MIB_EDGE_FRACTIONS`: 0.1% ... 50% of the edges) as
# sparsities; its 100% point is the full model, which every sweep evaluates as its reference.
MIB_SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999)
# Bumped when the meaning of a job's configuration changes, so stored results are not reused wrongly.
HASH_VERSION = 1

# key -> kind; "list:str" etc. are lists (a scalar is accepted as a one-element list).
KEYS = {
    "description": "str",
    "methods": "list:str",
    "tasks": "list:str",
    "models": "list:str",
    "sparsities": "sparsities",
    "n_train": "list:int",
    "n_validation": "int",
    "seeds": "list:int",
    "data_seed": "int",
    "method_preset": "str",
    "method_config": "method_config",
    "per_method": "per_method",
    "cut": "str",
    "eval_limit": "int",
    "eval_batch_size": "int",
    "device": "str",
    "dtype": "str",
    "jobs": "int",
    "backend": "str",
    "results": "str",
}
PER_METHOD_KEYS = ("seeds", "n_train")  # what [per_method.NAME] may set
PER_TASK_KEYS = ("methods", "models", "sparsities", "n_train", "n_validation", "seeds", "eval_limit",
                 "method_config")
DEFAULTS = {
    "models": [DEFAULT_MODEL],
    "sparsities": list(DEFAULT_SPARSITIES),
    "seeds": [0],
    "data_seed": 0,
    "method_preset": "paper",
    "method_config": {},
    "cut": "effective",
    "eval_batch_size": 32,
    "jobs": 1,
    "backend": "local",
    "results": "results",
}


# ---- parsing values ---------------------------------------------------------------------------------
def parse_sparsities(value, where: str = "sparsities") -> list[float]:
    """A list of sparsities from a list, a number, ``"0.9,0.95"``, a range ``"0.9:0.99:0.01"`` or
    ``"mib"`` (`MIB_SPARSITIES`)."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == "mib":
            values = list(MIB_SPARSITIES)
        elif text.count(":") == 2:
            try:
                start, stop, step = (float(x) for x in text.split(":"))
            except ValueError:
                raise UserError(f"{where}: bad range {value!r}; expected start:stop:step, e.g. 0.9:0.99:0.01") from None
            if step <= 0 or stop < start:
                raise UserError(f"{where}: range {value!r} needs step > 0 and stop >= start")
            n = int(math.floor((stop - start) / step + 1e-9)) + 1
            values = [round(start + i * step, 10) for i in range(n)]
        elif ":" in text:
            raise UserError(f"{where}: bad range {value!r}; expected start:stop:step, e.g. 0.9:0.99:0.01")
        else:
            try:
                values = [float(x) for x in text.split(",") if x.strip()]
            except ValueError:
                raise UserError(f"{where}: {value!r} is not a comma-separated list of numbers") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        values = [float(value)]
    elif isinstance(value, list):
        values = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise UserError(f"{where}: {v!r} is not a number")
            values.append(float(v))
    else:
        raise UserError(f"{where}: expected a list of numbers or a range string, got {value!r}")
    if not values:
        raise UserError(f"{where}: no sparsity given")
    for v in values:
        if not (0.0 <= v < 1.0) or math.isnan(v):
            raise UserError(f"{where}: sparsity {v:g} is outside [0, 1)")
    return sorted({round(v, 10) for v in values})


def _parse_list(value, kind: str, key: str):
    if isinstance(value, str):
        items = [x.strip() for x in value.split(",") if x.strip()]
    elif isinstance(value, list):
        items = value
    else:
        items = [value]
    if not items:
        raise UserError(f"{key}: empty list")
    out = []
    for item in items:
        if kind == "str":
            if not isinstance(item, str):
                raise UserError(f"{key}: {item!r} is not a string")
            out.append(item)
        else:
            try:
                if isinstance(item, bool) or (isinstance(item, float) and not item.is_integer()):
                    raise ValueError
                out.append(int(item))
            except (TypeError, ValueError):
                raise UserError(f"{key}: {item!r} is not a whole number") from None
    if len(set(out)) != len(out):
        raise UserError(f"{key}: {', '.join(map(str, out))} lists a value twice")
    return out


def _parse_value(key: str, value, where: str):
    kind = KEYS[key]
    label = f"{where}{key}"
    if kind == "str":
        if not isinstance(value, str):
            raise UserError(f"{label}: expected a string, got {value!r}")
        return value
    if kind == "int":
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise UserError(f"{label}: {value!r} is not a whole number") from None
    if kind.startswith("list:"):
        return _parse_list(value, kind[5:], label)
    if kind == "sparsities":
        return parse_sparsities(value, label)
    if kind == "per_method":
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            raise UserError(f"{label}: expected tables per method, e.g. [per_method.acdc] with n_train = [16]")
        out = {}
        for method, table in value.items():
            unknown = sorted(set(table) - set(PER_METHOD_KEYS))
            if unknown:
                raise UserError(f"{label}.{method}: unknown key(s) {', '.join(unknown)}; allowed: "
                                f"{', '.join(PER_METHOD_KEYS)}")
            out[method] = {k: _parse_list(v, "int", f"{label}.{method}.{k}") for k, v in table.items()}
        return out
    if kind == "method_config":
        if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
            raise UserError(f"{label}: expected tables of hyperparameters per method, e.g. [method_config.ep]")
        return {m: dict(v) for m, v in value.items()}
    raise AssertionError(kind)


def parse_set(items: list[str]) -> dict[str, dict]:
    """``["ep.steps=100", "acdc.tau=0.01"]`` -> ``{"ep": {"steps": 100}, "acdc": {"tau": 0.01}}``;
    values are read as TOML literals (so ``ep.lr=0.1``, ``x.flag=true``, ``x.name="a"``)."""
    out: dict[str, dict] = {}
    for item in items or []:
        key, eq, raw = item.partition("=")
        method, dot, name = key.strip().partition(".")
        if not eq or not dot or not method or not name:
            raise UserError(f"--set {item!r}: expected METHOD.FIELD=VALUE, e.g. ep.steps=100")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # a bare word is a string: --set acdc.metric=kl
        out.setdefault(method, {})[name] = value
    return out


@dataclass
class Source:
    """One layer of settings: top-level values and per-task tables."""

    name: str
    top: dict = field(default_factory=dict)
    per_task: dict[str, dict] = field(default_factory=dict)


def source_from_mapping(data: dict, name: str) -> Source:
    """Validate a TOML mapping (or the equivalent dict) into a `Source`; unknown keys are an error."""
    top, per_task = {}, {}
    for key, value in data.items():
        if key == "task":
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise UserError(f"{name}: [task.NAME] tables expected under 'task'")
            for task, table in value.items():
                entry = {}
                for k, v in table.items():
                    if k not in PER_TASK_KEYS:
                        raise UserError(f"{name}: unknown key {k!r} in [task.{task}]; allowed there: "
                                        f"{', '.join(PER_TASK_KEYS)}")
                    entry[k] = _parse_value(k, v, f"{name}: task.{task}.")
                from .tasks import canonical_task_name

                per_task[canonical_task_name(task)] = entry
            continue
        if key not in KEYS:
            raise UserError(f"{name}: unknown key {key!r}; known keys: {', '.join(list(KEYS) + ['task'])}")
        top[key] = _parse_value(key, value, f"{name}: ")
    return Source(name, top, per_task)


def load_toml(path) -> Source:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"sweep file {path} does not exist") from None
    except OSError as err:
        raise UserError(f"cannot read sweep file {path}: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"sweep file {path} is not valid TOML: {err}") from None
    return source_from_mapping(data, str(path))


def preset_path(name: str) -> Path:
    path = CONFIGS_DIR / f"{name}.toml"
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    if not path.exists():
        raise UserError(f"preset file {path} is missing (presets live in the configs/ folder of the checkout)")
    return path


def load_preset(name: str) -> Source:
    return load_toml(preset_path(name))


# ---- jobs ---------------------------------------------------------------------------------------------
def config_hash(config: dict) -> str:
    """16 hex digits of sha256 over the canonical JSON of ``config``."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class JobSpec:
    """Everything that defines one job (a discovery and the circuits it is evaluated at), resolved
    when the sweep is planned; ``config`` (what the id hashes) and ``job_id`` are computed once, here.

    ``sparsities`` are the circuits to evaluate: a method that trains one circuit per target has one
    (its ``target_sparsity``), a path run (Edge Pruning's ``schedule = "path"``) trains them all, a
    score method's ranking is cut at each (``cut``: `Circuit.from_sparsity`)."""

    method: str
    method_preset: str
    method_overrides: dict
    method_config: dict  # resolved hyperparameters for this task (what the method will use)
    produces: str
    task: str
    model: str
    n_train: int
    n_validation: int | None
    data_seed: int
    seed: int
    dtype: str
    device: str
    eval_limit: int | None
    eval_batch_size: int
    sparsities: tuple[float, ...]
    cut: str = "effective"
    tokenizer: str | None = None  # a random model's unusual tokenizer (`_tokenizer_tag`), part of the id
    config: dict = field(init=False, repr=False, compare=False)
    job_id: str = field(init=False, compare=False)

    def __post_init__(self):
        config = {"v": HASH_VERSION, "method": self.method, "method_preset": self.method_preset,
                  "method_config": self.method_config, "task": self.task, "model": self.model,
                  "n_train": self.n_train, "n_validation": self.n_validation, "data_seed": self.data_seed,
                  "seed": self.seed, "dtype": self.dtype, "device": self.device, "eval_limit": self.eval_limit,
                  "target_sparsity": self.target_sparsity}
        if self.produces == "circuits" and len(self.sparsities) > 1:
            config["targets"] = list(self.sparsities)  # one run trains them all (a path)
        if self.produces == "scores":
            config["cut"] = self.cut
        if self.tokenizer is not None:
            config["tokenizer"] = self.tokenizer
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "job_id", config_hash(config))

    derived_from = ()  # a discovery: built from no stored run (see `DerivedSpec`)

    @property
    def data(self):
        """The job's data (`circuitbench.tasks.base.DataSpec`): its seed and split sizes."""
        from .tasks.base import DataSpec

        return DataSpec(self.data_seed, self.n_train, self.n_validation)

    @property
    def target_sparsity(self) -> float | None:
        """A circuit method trained for one target: that target; otherwise None."""
        return self.sparsities[0] if self.produces == "circuits" and len(self.sparsities) == 1 else None

    @property
    def label(self) -> str:
        s = f" s={self.target_sparsity:g}" if self.target_sparsity is not None else f" x{len(self.sparsities)} sparsities"
        return f"{self.method} {self.task} {self.model} n={self.n_train} seed={self.seed}{s}"


@dataclass(frozen=True)
class DerivedSpec:
    """A job whose circuit is built from stored runs instead of discovered (the case study's
    intersection, ``method="intersection"``): the runs it is built from (``derived_from``), where
    it is evaluated, and the fields of its row copied from the jobs it derives from. Its id hashes
    ``{method}_of`` (the run ids), task, model, dtype, device, eval_limit and data seed."""

    method: str
    derived_from: tuple[str, ...]
    task: str
    model: str
    dtype: str
    device: str
    eval_limit: int | None
    data_seed: int
    method_preset: str | None = None
    n_train: int | None = None
    n_validation: int | None = None
    seed: int | None = None
    target_sparsity: float | None = None
    method_config: dict = field(default_factory=dict)
    config: dict = field(init=False, repr=False, compare=False)
    job_id: str = field(init=False, compare=False)

    def __post_init__(self):
        config = {"v": HASH_VERSION, "method": self.method, f"{self.method}_of": list(self.derived_from),
                  "task": self.task, "model": self.model, "dtype": self.dtype, "device": self.device,
                  "eval_limit": self.eval_limit, "data_seed": self.data_seed}
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "job_id", config_hash(config))

    @property
    def label(self) -> str:
        return f"{self.method} of {' and '.join(self.derived_from)}"


@dataclass
class Reference:
    """The full-model and empty-circuit evaluation of one test split."""

    ref_id: str
    task: str
    model: str
    dtype: str
    device: str
    data_seed: int
    eval_limit: int | None
    eval_batch_size: int
    n_validation: int | None = None  # the test split is drawn after the validation split

    @property
    def data(self):
        """The data the references are evaluated on: the default training size (`DataSpec`)."""
        from .tasks.base import DataSpec

        return DataSpec(self.data_seed, None, self.n_validation)


def _tokenizer_tag(model: str) -> str | None:
    """The tokenizer a job records in its id when it is not the model's usual one: "synthetic" for a
    random model under ``CIRCUITBENCH_RANDOM_TOKENIZER=synthetic``; None otherwise."""
    from . import models

    spec = models.ModelSpec.parse(model)
    if not spec.known_random:
        return None
    tok = models.random_tokenizer(spec.name)
    return tok if tok != "smollm2" else None


def reference_for(task, model, dtype, device, data_seed, eval_limit, eval_batch_size,
                  n_validation=None, tokenizer=None) -> Reference:
    key = {"v": HASH_VERSION, "kind": "reference", "task": task, "model": model, "dtype": dtype,
           "device": device, "data_seed": data_seed, "eval_limit": eval_limit}
    if n_validation is not None:  # keeps the ids of default-size splits unchanged
        key["n_validation"] = n_validation
    if tokenizer is not None:
        key["tokenizer"] = tokenizer
    return Reference(config_hash(key), task, model, dtype, device, data_seed, eval_limit, eval_batch_size,
                     n_validation)


def _jsonable(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def resolved_method_config(method_cls, preset: str, overrides: dict, task: str) -> dict:
    """The hyperparameters ``method_cls`` will use on the task named ``task``, as JSON (per-task
    entries applied, the ``per_task`` table itself dropped: other tasks' entries must not change
    this job's id; the method's ``run_settings`` dropped too: they never change its result)."""
    cfg = _jsonable(method_cls.resolve_config(preset, overrides, task))
    cfg.pop("per_task", None)
    for name in getattr(method_cls, "run_settings", ()):
        cfg.pop(name, None)
    return cfg


# ---- the sweep ----------------------------------------------------------------------------------------
@dataclass
class Sweep:
    """Layered settings (defaults < preset < config file < flags) and their expansion into jobs."""

    sources: list[Source]

    @classmethod
    def build(cls, preset: str | None = None, config: str | None = None, flags: dict | None = None,
              layers: tuple[Source, ...] = ()) -> "Sweep":
        """Layer the built-in defaults, a preset, a TOML file, further named ``layers`` (the case
        study's preset) and flag values (None = not given)."""
        sources = [Source("defaults", dict(DEFAULTS))]
        if preset:
            source = load_preset(preset)
            source.name = f"preset {preset} (configs/{preset}.toml)"
            sources.append(source)
            # A preset picks the method presets of the same name unless it says otherwise.
            sources[-1].top.setdefault("method_preset", preset)
        if config:
            sources.append(load_toml(config))
        sources.extend(layers)
        given = {k: v for k, v in (flags or {}).items() if v is not None}
        if given:
            sources.append(source_from_mapping(given, "command line"))
        return cls(sources)

    def get(self, key: str, task: str | None = None):
        """The value of ``key`` (for ``task`` when given): the latest source that sets it."""
        for src in reversed(self.sources):
            if task is not None and key in src.per_task.get(task, {}):
                return src.per_task[task][key]
            if key in src.top:
                return src.top[key]
        return None

    def per_method(self, method: str) -> dict:
        """The sweep settings one method overrides (``[per_method.NAME]``: seeds, n_train), later
        sources winning."""
        out = {}
        for src in self.sources:
            out.update(src.top.get("per_method", {}).get(method, {}))
        return out

    def method_overrides(self, method: str, task: str) -> dict:
        out = {}
        for src in self.sources:
            out.update(src.top.get("method_config", {}).get(method, {}))
            out.update(src.per_task.get(task, {}).get("method_config", {}).get(method, {}))
        return out

    def override_lines(self, jobs) -> list[str]:
        """One line per method, source and set of tasks saying which hyperparameters that source
        changes from the method's own preset (``steps 400 -> 40``), for the jobs of a plan. The
        changes are applied in the order of the precedence in the module docstring; a value equal to
        the one below it is no override and is not listed."""
        from .method import get_method

        lines: dict[str, list[str]] = {}
        seen = set()
        for job in jobs:
            key = (job.method, job.method_preset, job.task)
            if key in seen:
                continue
            seen.add(key)
            cls = get_method(job.method)
            current = _jsonable(cls.resolve_config(job.method_preset, {}, job.task))
            for src in self.sources:
                values = dict(src.top.get("method_config", {}).get(job.method, {}))
                values.update(src.per_task.get(job.task, {}).get("method_config", {}).get(job.method, {}))
                changed = []
                for name, value in values.items():
                    value = _jsonable(value)
                    if current.get(name) != value:
                        changed.append(f"{name} {current.get(name)!r} -> {value!r}")
                        current[name] = value
                if changed:
                    line = (f"{job.method} (its preset {job.method_preset!r}): {', '.join(changed)} "
                            f"[{src.name}]")
                    lines.setdefault(line, []).append(job.task)
        return [f"{line} on {', '.join(tasks)}" for line, tasks in lines.items()]

    @property
    def tasks(self) -> list[str]:
        tasks = self.get("tasks")
        if not tasks:
            raise UserError("no task given: use --task NAME (or a preset / --config file that names tasks)")
        from .tasks import canonical_task_name  # a bare PATH.jsonl is stored as custom:PATH.jsonl

        return [canonical_task_name(t) for t in tasks]

    def plan(self, device: str = "cpu", dtype: str | None = None) -> tuple[list[JobSpec], list[Reference]]:
        """Expand into jobs and reference evaluations, validating every name and size first.

        ``device`` is the device type jobs will run on (part of each job's id: timings and float
        results differ between devices); ``dtype`` overrides the sweep's dtype. Raises `UserError` for unknown methods, tasks, presets or
        hyperparameters and for training-set sizes a task cannot generate.
        """
        from .circuit import CUTS
        from .method import get_method
        from .tasks import get_task

        dtype = str(dtype or self.get("dtype") or "float32")
        method_preset = self.get("method_preset")
        jobs: dict[str, JobSpec] = {}
        refs: dict[str, Reference] = {}
        for task_name in self.tasks:
            task = get_task(task_name)
            methods = self.get("methods", task_name)
            if not methods:
                raise UserError("no method given: use --methods ep,acdc,eap (or a preset that names them)")
            method_classes = {m: get_method(m) for m in methods}
            models = self._models_for(task_name, task)
            sparsities = self._sparsities_for(task_name, task, models)
            n_validation = self.get("n_validation", task_name)
            sizes = {"validation": n_validation} if n_validation is not None else None

            def resolve_n(n_trains):
                resolved = []
                for n in n_trains or [None]:
                    if n is not None and n < 1:
                        raise UserError(f"n_train must be at least 1, got {n}")
                    try:
                        resolved.append(int(task.resolve_sizes(n, sizes)["train"]))
                    except ValueError as err:
                        raise UserError(f"{task_name}: {err}") from None
                return resolved

            resolved_n = resolve_n(self.get("n_train", task_name))
            seeds = self.get("seeds", task_name)
            data_seed = int(self.get("data_seed", task_name))
            eval_limit = self.get("eval_limit", task_name)
            if eval_limit is not None and eval_limit < 1:
                raise UserError(f"eval_limit must be at least 1, got {eval_limit}")
            eval_bs = int(self.get("eval_batch_size"))
            if eval_bs < 1:
                raise UserError(f"eval_batch_size must be at least 1, got {eval_bs}")
            cut = self.get("cut")
            if cut not in CUTS:
                raise UserError(f"unknown cut {cut!r}; choose one of {', '.join(CUTS)}")
            for model in models:
                # random models built with the synthetic tokenizer tokenise the tasks differently:
                # their results must not share ids with the SmolLM2-tokenised ones
                tokenizer = _tokenizer_tag(model)
                ref = reference_for(task_name, model, dtype, device, data_seed, eval_limit, eval_bs, n_validation,
                                    tokenizer)
                refs.setdefault(ref.ref_id, ref)
                for method_name, cls in method_classes.items():
                    overrides = self.method_overrides(method_name, task_name)
                    mcfg = resolved_method_config(cls, method_preset, overrides, task.name)
                    targets = cls.target_groups(mcfg, sparsities)
                    own = self.per_method(method_name)
                    method_n = resolve_n(own["n_train"]) if "n_train" in own else resolved_n
                    for n_train in method_n:
                        for seed in own.get("seeds", seeds):
                            for group in targets:
                                job = JobSpec(method_name, method_preset, dict(overrides), mcfg, cls.produces,
                                              task_name, model, n_train, n_validation, data_seed, seed, dtype,
                                              device, eval_limit, eval_bs, tuple(group), cut, tokenizer)
                                old = jobs.get(job.job_id)
                                if old is not None:  # the same job from two per-task entries: merge grids
                                    job = dataclasses.replace(old, sparsities=tuple(sorted(set(old.sparsities)
                                                                                           | set(group))))
                                jobs[job.job_id] = job
        return list(jobs.values()), list(refs.values())

    def _models_for(self, task_name: str, task) -> list[str]:
        # A task bound to one model (a Tracr program names its compiled model in
        # `Task.default_model`)
        # takes that model unless the command line or the task's own table says otherwise; a
        # file's general model list is meant for the language-model tasks.
        own = getattr(task, "default_model", None)
        for src in reversed(self.sources[1:]):
            if "models" in src.per_task.get(task_name, {}):
                return src.per_task[task_name]["models"]
            if "models" in src.top and (not own or src.name == "command line"):
                return src.top["models"]
        return [own] if own else list(DEFAULTS["models"])

    def _sparsities_for(self, task_name, task, models):
        """The sparsities asked for; for a task with a known circuit (Tracr) and none asked for, its
        ground truth's sparsity, so the default run scores recovery at the true size rather than
        at the language-model grid (which would cut a 23-edge graph to one or two edges)."""
        asked = any("sparsities" in src.top or "sparsities" in src.per_task.get(task_name, {})
                    for src in self.sources[1:])
        truth = getattr(task, "ground_truth", None)
        if asked or truth is None or len(models) != 1:
            return self.get("sparsities", task_name)
        from .models import load_model

        return [1.0 - len(truth()) / load_model(models[0]).graph.n_edges]

    def describe(self) -> str:
        """The sources in effect, one line."""
        names = [s.name for s in self.sources[1:]]
        desc = self.get("description")
        return (f"{desc} " if desc else "") + f"(settings: defaults{''.join(' < ' + n for n in names)})"
