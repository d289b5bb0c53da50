"""Indirect Object Identification (Wang et al. 2023): "When Mary and John went to the store,
John gave a drink to" -> " Mary".

Two tasks:

* ``ioi``: 30 templates (15 base sentences in datasets/ioi/templates.tsv, each in ABBA and BABA
  name order). Train and validation use the 20 templates of the "train" pool; test uses the 10 of
  the "test" pool, so test templates are never seen in training. Default sizes 200 / 200 / 36,084;
  the training set can be any size up to 100,000 and a larger one extends a smaller one (same
  seed), as if drawn from one pool.
* ``ioi-t1``: the single template of datasets/ioi/t1_template.txt, 50 examples per split.

Answer: the indirect object A; misleading answer: the subject B. Corruption (the "ABC" variant):
every name is replaced by a fresh random name (C, D, E: distinct from each other and from A, B),
so the corrupted prompt has a different answer. Names are the single-token first names (with a
leading space) of datasets/names/ for the tokenizer; clean and corrupted token lengths must match.
"""
from __future__ import annotations

from abc import abstractmethod

import torch

from ..errors import UserError
from . import register_task
from ._common import (AnswerPairTask, assemble, distinct_rows, draw_unique, read_lines,
                      single_token_ids, single_token_names, split_rng)
from .base import LazySplit, Splits

TRAIN_POOL_MAX = 100_000
ORDERS = ("ABBA", "BABA")


def load_names() -> list[str]:
    """Female and male first names of datasets/names/, without duplicates."""
    return list(dict.fromkeys(read_lines("names/female.txt") + read_lines("names/male.txt")))


def load_templates() -> list[tuple[str, str]]:
    """(pool, base template) rows of datasets/ioi/templates.tsv."""
    rows = []
    for line in read_lines("ioi/templates.tsv"):
        pool, _, template = line.partition("\t")
        if pool not in ("train", "test") or not template:
            raise UserError(f"datasets/ioi/templates.tsv: bad row {line!r} (expected 'train|test<TAB>template')")
        rows.append((pool, template))
    return rows


def render(template: str, order: str, a: str, b: str, place: str, obj: str) -> str:
    """A prompt: ABBA puts the indirect object first, BABA the subject; the repeat is the subject."""
    x, y = (a, b) if order == "ABBA" else (b, a)
    return template.format(X=x, Y=y, S=b, place=place, object=obj)


class _IOIBase(AnswerPairTask):
    """IOI over a list of (template, order) choices per split."""

    @abstractmethod
    def _templates_for(self, split: str) -> list[tuple[str, str]]:
        """The (template, order) pairs one split draws from."""

    def _generate(self, tokenizer, seed, sizes):
        all_names = load_names()
        names = single_token_names(tokenizer, all_names)
        if len(names) < 5:
            raise UserError(f"{self.name}: only {len(names)} names are single tokens for this tokenizer; need 5")
        places = read_lines("ioi/places.txt")
        objects = read_lines("ioi/objects.txt")
        name_ids = single_token_ids(tokenizer, [" " + n for n in names])

        seen: set = set()
        drawn = {}
        # Validation before train: the training pool excludes validation examples, and its draw
        # order never depends on the requested train size. Drawing is cheap; rendering and
        # tokenizing happen when a split is first used.
        for split in ("validation", "test", "train"):
            choices = self._templates_for(split)
            rng = split_rng(seed, self.name, split)

            def draw(chunk, choices=choices, rng=rng):
                t = rng.integers(0, len(choices), chunk)
                who = distinct_rows(rng, chunk, 5, len(names))  # A, B, then C, D, E for corruption
                pl = rng.integers(0, len(places), chunk)
                ob = rng.integers(0, len(objects), chunk)
                # A template without {place}/{object} ignores them, so they must not make it "new".
                return [((choices[t[i]], who[i, 0], who[i, 1],
                          pl[i] if "{place}" in choices[t[i]][0] else -1,
                          ob[i] if "{object}" in choices[t[i]][0] else -1),
                         (choices[t[i]], who[i], pl[i], ob[i])) for i in range(chunk)]

            drawn[split] = draw_unique(draw, sizes[split], seen)

        def build(items):
            clean, corrupted, texts, answers, wrongs = [], [], [], [], []
            for (template, order), who, pl, ob in items:
                a, b, c, d, e = (names[j] for j in who)
                place, obj = places[pl], objects[ob]
                clean.append(render(template, order, a, b, place, obj))
                # ABC corruption: positions X, Y and S all get new, distinct names.
                corrupted.append(template.format(X=c, Y=d, S=e, place=place, object=obj))
                answers.append(name_ids[" " + a])
                wrongs.append(name_ids[" " + b])
                texts.append({"clean": clean[-1], "corrupted": corrupted[-1], "answer": " " + a,
                              "wrong": " " + b, "template": template, "order": order})
            targets = {"answer": torch.tensor(answers, dtype=torch.long),
                       "wrong": torch.tensor(wrongs, dtype=torch.long)}
            return assemble(tokenizer, clean, corrupted, targets, texts)

        info = {"names": len(names), "names_not_single_token": len(all_names) - len(names),
                "templates": {s: len(self._templates_for(s)) for s in ("train", "validation", "test")}}
        return Splits(*(LazySplit(drawn[s], build) for s in ("train", "validation", "test")),
                      info=info)


@register_task("ioi")
class IOI(_IOIBase):
    name = "ioi"
    description = ("Indirect object identification, 30 templates (15 ABBA + 15 BABA); test templates "
                   "held out from training; corrupted prompts use three fresh names")
    sizes = {"train": 200, "validation": 200, "test": 36_084}

    def _templates_for(self, split):
        pools = load_templates()
        wanted = "test" if split == "test" else "train"
        return [(template, order) for pool, template in pools if pool == wanted for order in ORDERS]

    def resolve_sizes(self, n_train=None, sizes=None):
        out = super().resolve_sizes(n_train, sizes)
        if out["train"] > TRAIN_POOL_MAX:
            raise UserError(f"ioi: the training pool holds {TRAIN_POOL_MAX:,} examples; asked for {out['train']:,}")
        return out


@register_task("ioi-t1")
class IOIT1(_IOIBase):
    name = "ioi-t1"
    description = "Indirect object identification, one template; corrupted prompts use three fresh names"
    sizes = {"train": 50, "validation": 50, "test": 50}

    def _templates_for(self, split):
        (template,) = read_lines("ioi/t1_template.txt")
        return [(template, "ABBA")]
