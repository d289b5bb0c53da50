"""Gendered Pronoun (Mathwin et al. 2023): "So Mary is a really great friend, isn't" -> " she".

Templates in datasets/gp/templates.txt; first names in datasets/names/female.txt and male.txt
(kept when " Name" is one token for the tokenizer). 150 / 150 / 378 examples by default, half of
each gender (odd sizes give the extra one to alternating genders), no example in two splits.
Answer: the pronoun of the name's gender; misleading answer: the other pronoun. Corruption: the
name is replaced by a random name of the other gender, so the corrupted prompt's answer flips.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from . import register_task
from ._common import (AnswerPairTask, assemble, draw_unique, read_lines, single_token_ids,
                      single_token_names, split_rng)
from .base import LazySplit, Splits

PRONOUNS = {"female": " she", "male": " he"}
OTHER = {"female": "male", "male": "female"}


@register_task("gp")
class GenderedPronoun(AnswerPairTask):
    name = "gp"
    description = "Gendered pronoun: 'So Mary is a really great friend, isn't' -> ' she'; corrupted name of the other gender"
    sizes = {"train": 150, "validation": 150, "test": 378}

    def _generate(self, tokenizer, seed, sizes):
        templates = read_lines("gp/templates.txt")
        pools, excluded = {}, {}
        for gender in ("female", "male"):
            listed = read_lines(f"names/{gender}.txt")
            pools[gender] = single_token_names(tokenizer, listed)
            excluded[gender] = len(listed) - len(pools[gender])
            if not pools[gender]:
                raise UserError(f"gp: no {gender} name is a single token for this tokenizer")
        pronoun_ids = single_token_ids(tokenizer, list(PRONOUNS.values()))
        for gender, pronoun in PRONOUNS.items():
            if pronoun_ids[pronoun] is None:
                raise UserError(f"gp: the pronoun {pronoun!r} is not a single token for this tokenizer")

        seen: set = set()
        drawn = {}
        for split in ("validation", "test", "train"):
            per_gender = {"female": (sizes[split] + 1) // 2, "male": sizes[split] // 2}
            by_gender = {}
            for gender in ("female", "male"):
                rng = split_rng(seed, self.name, f"{split}/{gender}")

                def draw(chunk, rng=rng, gender=gender):
                    t = rng.integers(0, len(templates), chunk)
                    own = rng.integers(0, len(pools[gender]), chunk)
                    other = rng.integers(0, len(pools[OTHER[gender]]), chunk)
                    return [((int(t[i]), pools[gender][own[i]]),
                             (templates[t[i]], gender, pools[gender][own[i]], pools[OTHER[gender]][other[i]]))
                            for i in range(chunk)]

                by_gender[gender] = draw_unique(draw, per_gender[gender], seen)
            # Interleave so any prefix of a split is balanced too.
            f, m = by_gender["female"], by_gender["male"]
            drawn[split] = [x for pair in zip(f, m) for x in pair] + f[len(m):]

        def build(items):
            clean, corrupted, texts, answers, wrongs = [], [], [], [], []
            for template, gender, name, other in items:
                clean.append(template.format(name=name))
                corrupted.append(template.format(name=other))
                answers.append(pronoun_ids[PRONOUNS[gender]])
                wrongs.append(pronoun_ids[PRONOUNS[OTHER[gender]]])
                texts.append({"clean": clean[-1], "corrupted": corrupted[-1], "answer": PRONOUNS[gender],
                              "wrong": PRONOUNS[OTHER[gender]], "gender": gender})
            targets = {"answer": torch.tensor(answers, dtype=torch.long),
                       "wrong": torch.tensor(wrongs, dtype=torch.long)}
            return assemble(tokenizer, clean, corrupted, targets, texts)

        info = {"names": {g: len(p) for g, p in pools.items()}, "names_not_single_token": excluded,
                "templates": len(templates)}
        return Splits(*(LazySplit(drawn[s], build) for s in ("train", "validation", "test")), info=info)

