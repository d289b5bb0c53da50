"""The Task contract: what a task gives the engine, the methods and the evaluator.

A task turns source data (``datasets/``) and a tokenizer into three splits of example pairs:
a clean prompt, a corrupted prompt of the same token length, and the answers. Every split is one
`Examples`: right-padded tensors plus display texts. The task also says how a circuit is judged on
those examples: ``loss`` (the faithfulness loss methods minimise), ``objective`` (the
differentiable task metric EAP differentiates) and ``score`` (every metric, per example).

Logits handed to ``loss``/``objective``/``score`` are always ``[B, P, vocab]``: the model's
logits at the batch's scored positions (``Examples.positions``), nothing else.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, Union

import torch


@dataclass
class Examples:
    """One split: tensors right-padded to the longest example.

    ``positions`` indexes the tokens whose next-token prediction is scored (``[n, P]``, P=1 for
    most tasks). ``targets`` holds task-specific tensors whose first dimension is ``n`` (answer
    ids, misleading ids, years...). ``texts`` holds one dict per example for display.
    """

    clean: torch.Tensor
    corrupted: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    targets: dict[str, torch.Tensor]
    texts: list[dict]

    def __post_init__(self):
        n = self.clean.shape[0]
        if self.corrupted.shape != self.clean.shape or self.attention_mask.shape != self.clean.shape:
            raise ValueError(
                f"clean {tuple(self.clean.shape)}, corrupted {tuple(self.corrupted.shape)} and "
                f"attention_mask {tuple(self.attention_mask.shape)} must have one shape"
            )
        if self.positions.dim() != 2 or self.positions.shape[0] != n:
            raise ValueError(f"positions must be [n, P] with n={n}, got {tuple(self.positions.shape)}")
        for key, value in self.targets.items():
            if value.shape[0] != n:
                raise ValueError(f"target {key!r} has {value.shape[0]} rows, expected {n}")
        if len(self.texts) != n:
            raise ValueError(f"{len(self.texts)} texts for {n} examples")

    def __len__(self) -> int:
        return self.clean.shape[0]

    @property
    def seq_len(self) -> int:
        return self.clean.shape[1]

    @property
    def device(self) -> torch.device:
        return self.clean.device

    def select(self, idx) -> "Examples":
        """The examples at ``idx`` (indices, slice or bool mask), trimmed to their longest one."""
        if isinstance(idx, slice):
            rows = torch.arange(len(self))[idx]
        else:
            rows = torch.as_tensor(idx)
            if rows.dtype == torch.bool:
                rows = rows.nonzero().flatten()
            rows = rows.long().flatten()
        mask = self.attention_mask[rows]
        # Right padding: the longest real example fixes the width; nothing beyond it is needed.
        width = int(mask.sum(1).max()) if len(rows) else 0
        width = max(width, int(self.positions[rows].max()) + 1 if len(rows) else 0)
        rows_list = rows.tolist()
        return Examples(
            clean=self.clean[rows, :width],
            corrupted=self.corrupted[rows, :width],
            attention_mask=mask[:, :width],
            positions=self.positions[rows],
            targets={k: v[rows.to(v.device)] for k, v in self.targets.items()},
            texts=[self.texts[i] for i in rows_list],
        )

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator["Examples"]:
        """Consecutive batches of at most ``batch_size`` examples, each trimmed to its longest."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle:
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            yield self.select(order[start:start + batch_size])

    def to(self, device) -> "Examples":
        """The same examples with every tensor on ``device``."""
        return Examples(
            clean=self.clean.to(device),
            corrupted=self.corrupted.to(device),
            attention_mask=self.attention_mask.to(device),
            positions=self.positions.to(device),
            targets={k: v.to(device) for k, v in self.targets.items()},
            texts=self.texts,
        )


class LazySplit:
    """A split that is generated but not yet tokenized: its drawn ``items`` and a function
    ``build(items) -> (examples, n_dropped)`` that renders and tokenizes a list of them (keeping
    their order, dropping the ones that fail the tokenizer checks)."""

    def __init__(self, items: list, build: Callable[[list], "tuple[Examples, int]"]):
        self.items, self._build = items, build

    def __len__(self) -> int:
        return len(self.items)

    def __call__(self) -> "tuple[Examples, int]":
        return self._build(self.items)

    def head(self, n: int) -> Examples:
        """The first ``n`` examples of the built split, tokenizing only as many items as needed."""
        m = min(n, len(self.items))
        while True:
            examples, _ = self._build(self.items[:m])
            if len(examples) >= n or m == len(self.items):
                return examples.select(slice(0, n))
            m = min(len(self.items), 2 * m + 1)  # some items were dropped: take more


SplitSource = Union[Examples, LazySplit, Callable[[], "tuple[Examples, int]"]]


class Splits:
    """The three splits of a task built for one tokenizer.

    ``Splits(train, validation, test, dropped=None, variant=None, info=None)``; ``train``,
    ``validation`` and ``test`` are `Examples`, or `LazySplit`s (or any zero-argument callables
    returning ``(examples, n_dropped)``) that are built on first access, so a method that reads
    only the training split never pays for tokenizing a 36,084-example test split.

    ``dropped`` counts, per split, the generated examples the tokenizer checks rejected (reading it
    builds every split). ``variant`` names the task variant that was built when a task has several
    (gt: "two-digit" or "first-digit"; boolexpr: "codellama-inst" or "chat-template"). ``info``
    holds facts about the build worth showing a user (how many names passed the single-token
    check, ...).
    """

    names = ("train", "validation", "test")

    def __init__(self, train: SplitSource, validation: SplitSource, test: SplitSource,
                 dropped: dict[str, int] | None = None, variant: str | None = None,
                 info: dict | None = None):
        self._sources = {"train": train, "validation": validation, "test": test}
        self._built: dict[str, Examples] = {}
        self._dropped = dict(dropped or {})
        self.variant = variant
        self.info = dict(info or {})

    def head(self, name: str, n: int) -> Examples:
        """The first ``n`` examples of a split; a split not built yet is only tokenized that far."""
        if name not in self.names:
            raise ValueError(f"unknown split {name!r}: expected train, validation or test")
        source = self._sources[name]
        if name not in self._built and isinstance(source, LazySplit):
            return source.head(n)
        return self.split(name).select(slice(0, n))

    def split(self, name: str) -> Examples:
        """The split called ``name`` (train, validation or test), built on first use."""
        if name not in self.names:
            raise ValueError(f"unknown split {name!r}: expected train, validation or test")
        if name not in self._built:
            source = self._sources[name]
            if isinstance(source, Examples):
                examples = source
            else:
                examples, n_dropped = source()
                self._dropped[name] = self._dropped.get(name, 0) + int(n_dropped)
            self._built[name] = examples
            self._dropped.setdefault(name, 0)
            self._sources[name] = examples  # release the builder and what it holds
        return self._built[name]

    @property
    def train(self) -> Examples:
        return self.split("train")

    @property
    def validation(self) -> Examples:
        return self.split("validation")

    @property
    def test(self) -> Examples:
        return self.split("test")

    @property
    def dropped(self) -> dict[str, int]:
        for name in self.names:
            self.split(name)
        return {name: self._dropped[name] for name in self.names}

    def is_built(self, name: str) -> bool:
        return name in self._built

    def __repr__(self) -> str:
        parts = [f"{n}={len(self._built[n]) if n in self._built else '(not built)'}" for n in self.names]
        return f"Splits({', '.join(parts)}, variant={self.variant!r})"


@dataclass(frozen=True)
class DataSpec:
    """A job's data: a task's splits built with ``seed`` and the sizes the job used (``n_train``,
    ``n_validation``; None: the task's own). The one way the harness builds a job's examples: the
    runner, `circuitbench.evaluate`, the report's edge faithfulness and the case study all go through
    it, so a circuit is scored on the test split its job held out (test examples are drawn after
    train and validation, so the sizes take part in deciding them)."""

    seed: int = 0
    n_train: int | None = None
    n_validation: int | None = None

    def build(self, task: "Task", tokenizer) -> Splits:
        sizes = {"validation": self.n_validation} if self.n_validation is not None else None
        return task.build(tokenizer, seed=self.seed, n_train=self.n_train, sizes=sizes)


class Task(ABC):
    """A behaviour to find a circuit for: data plus the way a circuit is judged on it."""

    name: str
    description: str
    metrics: tuple[str, ...]
    ablation: str = "interchange"
    sizes: dict[str, int]

    @abstractmethod
    def build(self, tokenizer, seed: int = 0, n_train: int | None = None,
              sizes: dict[str, int] | None = None) -> Splits:
        """Generate the splits for ``tokenizer`` (deterministic per ``seed``).

        ``n_train`` overrides the train size; ``sizes`` overrides any of the default split sizes.
        """

    @abstractmethod
    def loss(self, circuit_logits: torch.Tensor, full_logits: torch.Tensor, batch: Examples) -> torch.Tensor:
        """Faithfulness loss to minimise, per example ``[B]``."""

    @abstractmethod
    def objective(self, logits: torch.Tensor, batch: Examples) -> torch.Tensor:
        """Differentiable task metric per example ``[B]``; higher = more of the behaviour."""

    @abstractmethod
    def score(self, circuit_logits: torch.Tensor, full_logits: torch.Tensor,
              batch: Examples) -> dict[str, torch.Tensor]:
        """Every metric in ``self.metrics``, per example ``[B]``."""

    def resolve_sizes(self, n_train: int | None = None, sizes: dict[str, int] | None = None) -> dict[str, int]:
        """The split sizes to build: defaults, then ``sizes``, then ``n_train``."""
        out = dict(self.sizes)
        for key, value in (sizes or {}).items():
            if key not in out:
                raise ValueError(f"unknown split {key!r} in sizes: expected {sorted(out)}")
            out[key] = int(value)
        if n_train is not None:
            out["train"] = int(n_train)
        for key, value in out.items():
            if value < 0:
                raise ValueError(f"split size for {key} must be >= 0, got {value}")
        return out

    def __repr__(self) -> str:
        return f"<Task {self.name}>"


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into ``(ids [n, S], attention_mask [n, S])``."""
    n = len(sequences)
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    width = int(lengths.max()) if n else 0
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    if n:
        flat = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
        mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
        ids[mask] = flat  # row-major fill matches the order of the flattened sequences
    else:
        mask = torch.zeros((0, 0), dtype=torch.bool)
    return ids, mask.long()
