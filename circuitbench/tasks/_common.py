"""Shared machinery of the generated tasks: source files, tokenizer checks, tensors, caching.

Every generated task follows one recipe: draw candidate examples from seeded random streams (one
stream per split, so one split never depends on another's size), render their texts, tokenize all
of a split in one batched call, drop the examples that fail the tokenizer checks (counted), and pad
the rest into an `Examples`.
"""
from __future__ import annotations

import os
import random
import zlib
from abc import abstractmethod
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import metrics
from ..errors import UserError
from .base import Examples, Splits, Task, pad_right

SPLITS = ("train", "validation", "test")


# ---- source data ------------------------------------------------------------------------------
def datasets_dir() -> Path:
    """The folder of task source files: $CIRCUITBENCH_DATASETS, else the repository's datasets/."""
    env = os.environ.get("CIRCUITBENCH_DATASETS")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "datasets"
    if not path.is_dir():
        raise UserError(f"task source data not found at {path}; set CIRCUITBENCH_DATASETS to the "
                        f"circuitbench datasets/ folder")
    return path


def read_lines(relative: str) -> list[str]:
    """Non-empty, non-comment lines of a datasets/ file (comments start with '#')."""
    path = datasets_dir() / relative
    if not path.is_file():
        raise UserError(f"task source file missing: {path}")
    return [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]


def split_rng(seed: int, task: str, split: str) -> np.random.Generator:
    """A random stream for one split of one task; streams are independent of each other."""
    return np.random.default_rng([seed, zlib.crc32(task.encode()), zlib.crc32(split.encode())])


def split_random(seed: int, task: str, split: str) -> random.Random:
    """Like `split_rng`, as a `random.Random` (much faster for many scalar draws)."""
    return random.Random(f"{seed}/{task}/{split}")


# ---- tokenizer checks ----------------------------------------------------------------------------
def tokenize(tokenizer, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of every text, in one batched call.

    A fast tokenizer is driven through its Rust backend directly (``encode_batch_fast``): the
    transformers wrapper spends more time converting 36,000 encodings to dicts than the backend
    spends tokenizing them. The first text is checked against the wrapper, so a tokenizer whose
    wrapper adds tokens the backend does not know about is tokenized by the wrapper instead.
    """
    texts = list(texts)
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        head = tokenizer(texts[:1], add_special_tokens=add_special_tokens)["input_ids"]
        first = backend.encode_batch_fast(texts[:1], add_special_tokens=add_special_tokens)[0].ids
        if list(head[0]) == list(first):
            return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def single_token_ids(tokenizer, strings: Sequence[str]) -> dict[str, int | None]:
    """Each distinct string's token id when it is exactly one token (no special tokens), else None."""
    unique = list(dict.fromkeys(strings))
    encoded = tokenize(tokenizer, unique, add_special_tokens=False)
    return {s: (ids[0] if len(ids) == 1 else None) for s, ids in zip(unique, encoded)}


def single_token_names(tokenizer, names: Sequence[str]) -> list[str]:
    """The names that are one token with a leading space (" Mary"), in their original order."""
    ids = single_token_ids(tokenizer, [" " + n for n in names])
    return [n for n in names if ids[" " + n] is not None]


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def assemble(tokenizer, clean: list[str], corrupted: list[str], targets: dict[str, torch.Tensor],
             texts: list[dict], keep: torch.Tensor | None = None,
             add_special_tokens: bool = True, clean_ids: list[list[int]] | None = None) -> tuple[Examples, int]:
    """Tokenize a split, drop examples whose clean and corrupted token lengths differ (or whose
    ``keep`` is False), and pad the rest. Returns the examples and the number dropped.

    ``clean_ids`` passes the clean prompts' tokens when the caller already has them. The scored
    position is the last token of the clean prompt: its next-token prediction.
    """
    n = len(clean)
    if clean_ids is None:
        clean_ids = tokenize(tokenizer, clean, add_special_tokens)
    corrupted_ids = tokenize(tokenizer, corrupted, add_special_tokens)
    same_length = torch.tensor([len(a) == len(b) for a, b in zip(clean_ids, corrupted_ids)], dtype=torch.bool)
    ok = same_length if keep is None else same_length & keep
    rows = ok.nonzero().flatten().tolist()
    pad = pad_id(tokenizer)
    ids, mask = pad_right([clean_ids[i] for i in rows], pad)
    bad, _ = pad_right([corrupted_ids[i] for i in rows], pad)
    lengths = mask.sum(1)
    examples = Examples(
        clean=ids,
        corrupted=bad,
        attention_mask=mask,
        positions=(lengths - 1).clamp(min=0).unsqueeze(1),
        targets={k: v[ok] for k, v in targets.items()},
        texts=[texts[i] for i in rows],
    )
    return examples, n - len(rows)


# ---- the generated-task base -----------------------------------------------------------------------
class GeneratedTask(Task):
    """A task whose splits are generated from datasets/ files for a tokenizer.

    Builds are cached per (tokenizer, seed, sizes) for the life of the process, so building the
    same splits twice (a method, then the evaluator) costs nothing. Treat built splits as
    read-only: the cache hands the same tensors to every caller.
    """

    _cache: "OrderedDict[tuple, tuple[object, Splits]]" = OrderedDict()
    _cache_size = 8

    def build(self, tokenizer, seed: int = 0, n_train: int | None = None,
              sizes: dict[str, int] | None = None) -> Splits:
        if tokenizer is None:
            raise UserError(f"task {self.name} needs a tokenizer, and this model has none")
        sizes = self.resolve_sizes(n_train, sizes)
        key = (type(self), self._cache_key(), id(tokenizer), int(seed), tuple(sorted(sizes.items())))
        hit = GeneratedTask._cache.get(key)
        # The tokenizer is stored with the splits, so its id cannot be reused while cached.
        if hit is not None and hit[0] is tokenizer:
            GeneratedTask._cache.move_to_end(key)
            return hit[1]
        splits = self._generate(tokenizer, int(seed), sizes)
        GeneratedTask._cache[key] = (tokenizer, splits)
        while len(GeneratedTask._cache) > GeneratedTask._cache_size:
            GeneratedTask._cache.popitem(last=False)
        return splits

    def _cache_key(self) -> tuple:
        """Anything besides the class that changes what ``_generate`` produces."""
        return ()

    @abstractmethod
    def _generate(self, tokenizer, seed: int, sizes: dict[str, int]) -> Splits:
        """Build the splits of the given sizes (before tokenizer drops)."""


class AnswerPairTask(GeneratedTask):
    """A task scored by a correct and a misleading answer token (targets "answer", "wrong").

    loss: KL(full ‖ circuit) over the whole vocabulary; objective: logit difference; metrics: KL,
    logit difference, accuracy (correct beats misleading) and exact match (same top token).
    """

    metrics = ("kl", "logit_diff", "accuracy", "exact_match")

    def loss(self, circuit_logits, full_logits, batch):
        return metrics.kl_divergence(full_logits, circuit_logits)

    def objective(self, logits, batch):
        return metrics.logit_difference(logits, batch.targets["answer"], batch.targets["wrong"])

    def score(self, circuit_logits, full_logits, batch):
        answer, wrong = batch.targets["answer"], batch.targets["wrong"]
        return {
            "kl": metrics.kl_divergence(full_logits, circuit_logits),
            "logit_diff": metrics.logit_difference(circuit_logits, answer, wrong),
            "accuracy": metrics.accuracy(circuit_logits, answer, wrong),
            "exact_match": metrics.exact_match(full_logits, circuit_logits),
        }


def distinct_rows(rng: np.random.Generator, n: int, k: int, high: int) -> np.ndarray:
    """``n`` rows of ``k`` distinct integers in [0, high), drawn by rejection (vectorised)."""
    if k > high:
        raise ValueError(f"cannot draw {k} distinct values from {high}")
    out = rng.integers(0, high, size=(n, k))
    while True:
        s = np.sort(out, axis=1)
        bad = (s[:, 1:] == s[:, :-1]).any(axis=1) if k > 1 else np.zeros(n, dtype=bool)
        if not bad.any():
            return out
        out[bad] = rng.integers(0, high, size=(int(bad.sum()), k))


def draw_unique(draw, n: int, seen: set, chunk: int = 4096, max_rounds: int = 1000):
    """Collect ``n`` candidates with keys not in ``seen`` from ``draw(chunk) -> list[(key, item)]``.

    Candidates are taken in draw order, so the first ``m`` of a request for ``n >= m`` equal a
    request for ``m``: a larger training set extends a smaller one. ``seen`` is updated.
    """
    items = []
    rounds = 0
    while len(items) < n:
        rounds += 1
        if rounds > max_rounds:
            raise UserError(f"could only generate {len(items)} distinct examples of {n} requested; "
                            f"the source data is too small for this split size")
        for key, item in draw(chunk):
            if key in seen:
                continue
            seen.add(key)
            items.append(item)
            if len(items) == n:
                break
    return items
