"""The CircuitMethod contract: how a circuit discovery method plugs into the harness.

A method is a `CircuitMethod` subclass with a dataclass of hyperparameters (``Config``), named
presets of that dataclass (at least ``paper``, ``quick`` and ``smoke``; a preset changes budgets,
never the algorithm) and one entry point, ``discover``. It returns a `MethodResult`: either edge
scores (a ranking the harness cuts at any sparsity: ``produces = "scores"``) or one circuit per
requested sparsity (``produces = "circuits"``), plus what it spent (`Cost`).

Methods are found by name through a registry. Built-in ones live in the top-level ``methods``
package and, like any third-party method, are declared in the entry-point group
``circuitbench.methods`` (``ep = "methods.edge_pruning:EdgePruning"``); circuitbench itself never
imports a method module by name. ``@register_method`` registers a class directly.

Hyperparameters resolve in this order: the Config defaults, the preset, the preset's per-task
entries (a ``per_task`` field of the Config, ``{task name: {field: value}}``, e.g. the Edge Pruning
paper's node target per task), and last the caller's explicit overrides, each checked against
the Config field's type (`check_overrides`). `CircuitMethod.resolve_config` does this for a class,
without instantiating the method: the sweep resolves every job's hyperparameters that way.

A method may build on other methods' scores (an ensemble): `CircuitMethod.score_inputs` names the
(method, hyperparameters) whose scores it can use, and the runner hands it the ones its results
store already holds for the same data as `StoredScores` in ``method.stored`` before ``discover``;
a method never reads the store itself.

A method that runs long may save its state and resume from it: for a job its results store will
record, the runner sets ``method.checkpoint`` (a `circuitbench.checkpoint.Checkpoint` keyed by the
job id, at ``<store>/checkpoints/<job_id>.pt``; None otherwise) before ``discover``. ``discover``
may ``save`` a state dict there now and then and, when it finds one on ``load``, continue from it;
the state must carry whatever tells the method it was written under the same configuration (the
job id is checked by the checkpoint), and the result must be the uninterrupted run's. The store
removes the file once the job is recorded. Methods that ignore it still work (ACDC and Edge Pruning
use it, through `circuitbench.checkpoint.StateSaver`). Config fields that change how a run goes but never
its result (ACDC's and Edge Pruning's ``checkpoint_every_s``) are
named in ``run_settings``: they are left out of the job's id (`circuitbench.sweep.resolved_method_config`),
so changing one neither reruns a complete job nor orphans a checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
import time
import types
import typing
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .circuit import Circuit
from .errors import UserError

ENTRY_POINT_GROUP = "circuitbench.methods"


@dataclass
class Cost:
    """What a method spent: wall time per phase, passes over a batch, peak memory."""

    wall_s: dict[str, float] = field(default_factory=dict)
    forward_passes: int = 0  # masked or plain forward passes over one batch
    backward_passes: int = 0
    peak_memory_mib: float | None = None  # CUDA: max allocated; CPU: peak RSS growth; None: not measurable

    @property
    def total_s(self) -> float:
        return sum(self.wall_s.values())

    def to_dict(self) -> dict:
        return {"wall_s": dict(self.wall_s), "total_s": self.total_s, "forward_passes": self.forward_passes,
                "backward_passes": self.backward_passes, "peak_memory_mib": self.peak_memory_mib}


@dataclass
class MethodResult:
    """A method's output: ``scores`` [W, R] (larger |score| = more important; entries outside
    ``graph.valid`` are ignored) and/or ``circuits`` (target sparsity -> circuit)."""

    scores: torch.Tensor | None = None
    circuits: dict[float, Circuit] | None = None
    cost: Cost = field(default_factory=Cost)
    log: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)  # method-specific facts worth storing (realised sparsities, ...)


@dataclass
class StoredScores:
    """Edge scores another method's complete job left in the results store, handed to a method by the
    harness (`CircuitMethod.score_inputs`): ``scores`` [W, R] (NaN outside the graph), what that job
    spent, and its id."""

    method: str
    job_id: str
    scores: object  # numpy array or tensor [W, R]
    cost: Cost = field(default_factory=Cost)


class CircuitMethod(ABC):
    """A circuit discovery method. ``cls(config=None, preset=None, **overrides)``."""

    name: ClassVar[str]
    description: ClassVar[str]
    Config: ClassVar[type]
    presets: ClassVar[dict[str, dict]] = {}
    produces: ClassVar[str]  # "scores" or "circuits"
    run_settings: ClassVar[tuple[str, ...]] = ()  # Config fields left out of the job id (module docstring)

    def __init__(self, config=None, preset: str | None = None, **overrides):
        if config is not None and not isinstance(config, self.Config):
            raise TypeError(f"config must be a {self.Config.__name__}, got {type(config).__name__}")
        self.preset = preset
        self.overrides = dict(overrides)
        self.config = self._layered(config, preset, overrides)
        self.stored: dict[str, StoredScores] = {}  # filled by the runner, see `score_inputs`
        self.checkpoint = None  # a `circuitbench.checkpoint.Checkpoint` set by the runner (module docstring)

    def config_for(self, task) -> object:
        """The Config with the ``per_task`` entries for ``task`` applied (explicit overrides win)."""
        return self._for_task(self.config, self.preset, self.overrides, getattr(task, "name", None))

    @classmethod
    def resolve_config(cls, preset: str | None = None, overrides: dict | None = None, task: str | None = None):
        """The Config this method runs with on the task named ``task``: defaults, ``preset``, the
        preset's per-task entries, ``overrides`` (checked: known names, values of the field's type),
        then `check_config` and `complete_config`. No method is instantiated."""
        overrides = dict(overrides or {})
        return cls._for_task(cls._layered(None, preset, overrides), preset, overrides, task)

    @classmethod
    def _layered(cls, base, preset: str | None, overrides: dict):
        if preset is not None and preset not in cls.presets:
            raise UserError(f"method {cls.name!r} has no preset {preset!r}; presets: {', '.join(cls.presets)}")
        check_overrides(cls, overrides)
        values = dict(cls.presets[preset]) if preset is not None else {}
        values.update(overrides)
        return dataclasses.replace(base if base is not None else cls.Config(), **values)

    @classmethod
    def _for_task(cls, config, preset: str | None, overrides: dict, task: str | None):
        per_task = getattr(config, "per_task", None) or {}
        entry = {k: v for k, v in per_task.get(task, {}).items() if k not in overrides}
        config = dataclasses.replace(config, **entry) if entry else config
        cls.check_config(config)
        return cls.complete_config(config, preset, task)

    @classmethod
    def complete_config(cls, config, preset: str | None, task: str | None):
        """The resolved Config with anything derived from it filled in (an ensemble resolves its
        members' configurations here); the default returns ``config``."""
        return config

    @classmethod
    def check_config(cls, config) -> None:
        """Raise `UserError` for hyperparameter values this method cannot run with (called when a
        sweep is planned, before any job starts). The default checks nothing."""

    @classmethod
    def score_inputs(cls, config: dict) -> dict[str, tuple[str, dict]]:
        """Other methods' scores this method can use instead of computing them itself, under its
        resolved hyperparameters ``config``: ``{key: (method name, that method's resolved
        hyperparameters)}``. Before ``discover`` the runner puts in ``self.stored[key]`` a
        `StoredScores` for each one its results store holds from a complete job of that method and
        those hyperparameters on the same data (task, model, training and validation sizes, data
        seed, seed, dtype, device type, tokenizer); a key without one is absent. The default uses none."""
        return {}

    @classmethod
    def budget(cls, config: dict, n_train: int) -> str:
        """One line saying what this method may spend under the resolved hyperparameters ``config``
        on ``n_train`` training examples (printed when a sweep starts)."""
        batch = config.get("batch_size")
        return f"{n_train} training examples" + (f" in batches of {batch}" if batch else "")

    @classmethod
    def target_groups(cls, config: dict, sparsities) -> list[tuple[float, ...]]:
        """How a sweep's sparsities split into jobs, given the resolved hyperparameters ``config``:
        one job per target for a method that trains one circuit per target, one job for the whole
        grid for a score method (its ranking is cut at each)."""
        if cls.produces == "circuits":
            return [(float(s),) for s in sparsities]
        return [tuple(float(s) for s in sparsities)]

    @abstractmethod
    def discover(self, engine, task, train, validation, sparsities: list[float], seed: int = 0,
                 progress: bool = True) -> MethodResult:
        """Find the circuit(s) for ``task`` on ``train`` with ``engine`` (a `MaskedModel`)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} preset={self.preset!r}>"


# ---- hyperparameter overrides -------------------------------------------------------------------------
def _accepts(kind, value) -> bool:
    """Whether ``value`` (a TOML/JSON literal) fits the annotation ``kind`` of a Config field."""
    if kind is object or kind is typing.Any:
        return True
    if kind is type(None):
        return value is None
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(k, value) for k in typing.get_args(kind))
    kind = origin or kind
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    if kind is tuple:
        return isinstance(value, (tuple, list))
    return isinstance(value, kind)


def _kind_name(kind) -> str:
    return kind.__name__ if isinstance(kind, type) else str(kind)


def check_overrides(method_cls, overrides: dict) -> None:
    """Raise `UserError` for an override that names no field of ``method_cls.Config`` or whose value
    is not of the field's type (``--set ep.steps=abc``); runs when a sweep is planned."""
    kinds = typing.get_type_hints(method_cls.Config)
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(method_cls.Config)})
    if unknown:
        raise UserError(f"unknown {method_cls.name} hyperparameter(s) {', '.join(unknown)}; "
                        f"known: {', '.join(sorted(kinds))}")
    for name, value in overrides.items():
        if not _accepts(kinds[name], value):
            raise UserError(f"{method_cls.name}.{name}: expected {_kind_name(kinds[name])}, got {value!r}")


# ---- the registry -------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[CircuitMethod]] = {}
_entry_points_loaded = False


def register_method(cls):
    """Class decorator: register a `CircuitMethod` subclass under ``cls.name``."""
    if not (isinstance(cls, type) and issubclass(cls, CircuitMethod)):
        raise TypeError(f"{cls!r} is not a CircuitMethod subclass")
    for attr in ("name", "description", "Config", "produces"):
        if not hasattr(cls, attr):
            raise TypeError(f"method class {cls.__name__} lacks {attr!r}")
    if cls.produces not in ("scores", "circuits"):
        raise TypeError(f"{cls.__name__}.produces must be 'scores' or 'circuits', got {cls.produces!r}")
    missing = {"paper", "quick", "smoke"} - set(cls.presets)
    if missing:
        raise TypeError(f"{cls.__name__} lacks preset(s) {', '.join(sorted(missing))}")
    other = _REGISTRY.get(cls.name)
    where = (cls.__module__, cls.__qualname__)
    # the same class seen twice (decorator, then entry point) is fine; two different ones are not
    if other is not None and (other.__module__, other.__qualname__) != where:
        raise ValueError(f"method {cls.name!r} registered twice ({other.__module__}.{other.__qualname__}, "
                         f"{cls.__module__}.{cls.__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = ep.load()
        except Exception as err:  # a broken plug-in must say which one it is
            raise RuntimeError(f"cannot load circuit method {ep.name!r} ({ep.value}): {err}") from err
        if not (isinstance(cls, type) and issubclass(cls, CircuitMethod)):
            raise RuntimeError(f"entry point {ep.name!r} ({ep.value}) is not a CircuitMethod subclass")
        if ep.name != cls.name:
            raise RuntimeError(f"entry point {ep.name!r} names a method called {cls.name!r}")
        register_method(cls)


def list_methods() -> dict[str, type[CircuitMethod]]:
    """Every registered method by name (entry points included), sorted by name."""
    _load_entry_points()
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str) -> type[CircuitMethod]:
    """The method class called ``name``; UserError listing the known names otherwise."""
    methods = list_methods()
    if name not in methods:
        known = ", ".join(methods) or "none (is the package installed? pip install -e .)"
        raise UserError(f"unknown method {name!r}; known methods: {known}")
    return methods[name]


# ---- turning results into circuits --------------------------------------------------------------------
def circuits_at(result: MethodResult, graph, sparsities, cut: str = "effective") -> dict[float, Circuit]:
    """Circuits at ``sparsities``: the method's own circuit where it made one for that target,
    otherwise its scores cut there (``Circuit.from_sparsity``; ``cut="effective"``: the top edges
    until 1 - sparsity of the graph's edges are effective, ``"edges"``: the top edges)."""
    out = {}
    own = result.circuits or {}
    for s in sparsities:
        s = float(s)
        match = next((k for k in own if math.isclose(float(k), s, abs_tol=1e-9)), None)
        if match is not None:
            out[s] = own[match]
        elif result.scores is not None:
            out[s] = Circuit.from_sparsity(graph, result.scores, s, meta={"cut_from": "scores"}, cut=cut)
        else:
            raise UserError(f"the method made no circuit at sparsity {s} and gave no scores to cut one from")
    return out


# ---- measuring cost -----------------------------------------------------------------------------------
def _rss_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class CostMeter:
    """Collects a `Cost` while a method runs.

    ``with meter.phase("train"): ...`` adds the wall time of a phase (device work is synchronised
    first on CUDA); ``meter.forward(n)``/``meter.backward(n)`` count passes; ``meter.finish()``
    returns the Cost with the peak memory since the meter was made (CUDA: peak allocated bytes;
    CPU on Linux: peak resident memory growth, the kernel's high-water mark being reset at start;
    elsewhere: None).
    """

    def __init__(self, device=None):
        self.cost = Cost()
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._cuda = self.device.type == "cuda"
        if self._cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._base = None
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
                self._base = _rss_kib("VmRSS")
            except OSError:
                self._base = None

    def _sync(self):
        if self._cuda:
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.cost.wall_s[name] = self.cost.wall_s.get(name, 0.0) + time.perf_counter() - t0

    def forward(self, n: int = 1):
        self.cost.forward_passes += n

    def backward(self, n: int = 1):
        self.cost.backward_passes += n

    def finish(self) -> Cost:
        if self._cuda:
            self.cost.peak_memory_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self._base is not None:
            hwm = _rss_kib("VmHWM")
            self.cost.peak_memory_mib = None if hwm is None else max(hwm - self._base, 0) / 1024
        return self.cost


def seeded_generator(seed: int, device=None) -> torch.Generator:
    """A torch generator seeded with ``seed`` on ``device`` (methods never use the global RNG)."""
    gen = torch.Generator(device=device if device is not None else "cpu")
    gen.manual_seed(int(seed))
    return gen


__all__ = ["ENTRY_POINT_GROUP", "CircuitMethod", "check_overrides", "Cost", "CostMeter", "MethodResult", "StoredScores", "circuits_at",
           "get_method", "list_methods", "register_method", "seeded_generator"]
