"""A user's own task from a JSONL file: ``--task custom:PATH.jsonl``.

One JSON object per line with string fields ``clean``, ``corrupted``, ``answer`` and
``wrong_answer`` (the continuations, usually with their leading space: " Mary"), and optionally
``split`` ("train", "validation" or "test"). Lines without a split are shuffled with the seed and
dealt to train, validation and test in equal thirds (remainders to train first). Blank lines are
ignored; any other malformed line rejects the whole file with its line number.

Tokenizer checks, counted as drops per split: ``answer`` and ``wrong_answer`` must each be one
token, and clean and corrupted must have the same token length. Metrics as for IOI: KL(full ‖
circuit), logit difference (answer − wrong answer), accuracy, exact match.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from ..errors import UserError
from ._common import AnswerPairTask, assemble, single_token_ids
from .base import LazySplit, Splits

FIELDS = ("clean", "corrupted", "answer", "wrong_answer")
SPLIT_NAMES = ("train", "validation", "test")


def read_jsonl(path: Path) -> list[dict]:
    """The file's records (each with its line number as ``line``); UserError naming the bad line."""
    if not path.is_file():
        raise UserError(f"custom task file not found: {path}")
    records = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            missing = [f for f in FIELDS if f not in obj]
            if missing:
                raise UserError(f"{where}: missing field(s) {', '.join(missing)} "
                                f"(need {', '.join(FIELDS)}; optional split)")
            for field in FIELDS:
                if not isinstance(obj[field], str) or not obj[field]:
                    raise UserError(f"{where}: field {field!r} must be a non-empty string")
            split = obj.get("split")
            if split is not None and split not in SPLIT_NAMES:
                raise UserError(f"{where}: split must be one of {', '.join(SPLIT_NAMES)}, got {split!r}")
            unknown = sorted(set(obj) - set(FIELDS) - {"split"})
            if unknown:
                raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}")
            records.append({**{f: obj[f] for f in FIELDS}, "split": split, "line": lineno})
    if not records:
        raise UserError(f"{path}: no examples")
    return records


class CustomTask(AnswerPairTask):
    """A task read from a JSONL file of (clean, corrupted, answer, wrong_answer) examples."""

    description = "Your own examples from a JSONL file (clean, corrupted, answer, wrong_answer[, split])"

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.name = f"custom:{path}"
        self.records = read_jsonl(self.path)
        self._mtime = self.path.stat().st_mtime_ns
        counts = {s: sum(r["split"] == s for r in self.records) for s in SPLIT_NAMES}
        unsplit = sum(r["split"] is None for r in self.records)
        for i, s in enumerate(SPLIT_NAMES):
            counts[s] += unsplit // 3 + (i < unsplit % 3)
        self.sizes = counts

    def _cache_key(self):
        return (str(self.path.resolve()), self._mtime)

    def _assign(self, seed: int) -> dict[str, list[dict]]:
        """Records per split: given splits kept, the rest shuffled and dealt in thirds."""
        out = {s: [r for r in self.records if r["split"] == s] for s in SPLIT_NAMES}
        unsplit = [r for r in self.records if r["split"] is None]
        random.Random(f"{seed}/custom").shuffle(unsplit)
        start = 0
        for i, s in enumerate(SPLIT_NAMES):
            take = len(unsplit) // 3 + (i < len(unsplit) % 3)
            out[s] += unsplit[start:start + take]
            start += take
        return out

    def _generate(self, tokenizer, seed, sizes):
        assigned = self._assign(seed)
        for s in SPLIT_NAMES:
            if sizes[s] > len(assigned[s]):
                raise UserError(f"{self.name}: asked for {sizes[s]} {s} examples, the file has {len(assigned[s])}")
        ids = single_token_ids(tokenizer, [r[k] for r in self.records for k in ("answer", "wrong_answer")])

        def build(records):
            keep = torch.tensor([ids[r["answer"]] is not None and ids[r["wrong_answer"]] is not None
                                 for r in records], dtype=torch.bool)
            targets = {"answer": torch.tensor([ids[r["answer"]] or 0 for r in records], dtype=torch.long),
                       "wrong": torch.tensor([ids[r["wrong_answer"]] or 0 for r in records], dtype=torch.long)}
            texts = [{"clean": r["clean"], "corrupted": r["corrupted"], "answer": r["answer"],
                      "wrong": r["wrong_answer"], "line": r["line"]} for r in records]
            return assemble(tokenizer, [r["clean"] for r in records], [r["corrupted"] for r in records],
                            targets, texts, keep=keep)

        return Splits(*(LazySplit(assigned[s][:sizes[s]], build) for s in SPLIT_NAMES),
                      info={"file": str(self.path), "lines": len(self.records)})
