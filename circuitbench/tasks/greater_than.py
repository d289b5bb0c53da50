"""Greater-Than (Hanna et al. 2023): "The war lasted from the year 1732 to the year 17" -> a
two-digit continuation greater than 32.

5 templates (datasets/gt/templates.txt), 120 nouns (datasets/gt/nouns.txt), years 1100-2199;
150 / 150 / 12,240 examples by default, no example in two splits. Corruption: the start year's
last two digits become "01", so (almost) every continuation is "greater".

Two variants, chosen from the tokenizer and reported in ``Splits.variant``:

* ``two-digit`` (tokenizers with one token per two-digit number, like GPT-2): the prompt ends with
  the century token and the answer is one of the 100 tokens "00".."99". YY ranges over 02..98.
  Predictions are restricted to those 100 tokens (renormalised): probability difference
  P(YY+1..99) − P(00..YY−1), probability difference 10 P(YY+1..YY+10) − P(YY−10..YY−1), Kendall's
  τ between the full model's and the circuit's rankings of the 100, KL and exact match over them.
* ``first-digit`` (digit-by-digit tokenizers, like Llama and SmolLM2): the prompt ends with the
  century's digits and the scored prediction is the end year's first digit Y1 of YY = Y1Y2, over
  the 10 digit tokens (renormalised). Probability difference P(digit > Y1) − P(digit < Y1);
  probability difference 10 becomes its one-digit neighbourhood P(Y1+1) − P(Y1−1) (the digits
  whose years lie within about ten of the start year); τ, KL and exact match over the 10 digits.
  YY ranges over 10..98 so that the corruption "01" (Y1 = 0) always changes the answer set.
"""
from __future__ import annotations

import torch

from .. import metrics
from ..errors import UserError
from . import register_task
from ._common import GeneratedTask, assemble, draw_unique, read_lines, split_rng, tokenize
from .base import LazySplit, Splits

CENTURIES = range(11, 22)  # years 1100-2199
CORRUPT_YY = 1


def detect_variant(tokenizer) -> str:
    """"two-digit" when years split as century token + two-digit token; "first-digit" when every
    digit is its own token; UserError for anything else."""
    probe = tokenize(tokenizer, [" 1732", " 17", "32", "3", "7"], add_special_tokens=False)
    year, century, yy, three, seven = probe
    if len(yy) == 1 and year == century + yy:
        return "two-digit"
    if len(three) == 1 and len(seven) == 1 and year[-2:] == three + tokenize(tokenizer, ["2"], False)[0]:
        return "first-digit"
    raise UserError("gt: this tokenizer splits years neither as century + two digits nor digit by "
                    "digit; the Greater-Than task is not defined for it")


def regular_years(tokenizer, variant: str, years) -> dict[tuple[int, int], bool]:
    """Whether each (century, YY) start year tokenizes as the answers do: " XX" then "YY" as one
    token (two-digit), or one token per digit (first-digit)."""
    years = sorted(years)
    whole = tokenize(tokenizer, [f" {xx}{yy:02d}" for xx, yy in years], add_special_tokens=False)
    centuries = tokenize(tokenizer, [f" {xx}" for xx, _ in years], add_special_tokens=False)
    if variant == "two-digit":
        tails = tokenize(tokenizer, [f"{yy:02d}" for _, yy in years], add_special_tokens=False)
        return {y: len(t) == 1 and w == c + t for y, w, c, t in zip(years, whole, centuries, tails)}
    digits = [ids[0] for ids in tokenize(tokenizer, [str(k) for k in range(10)], add_special_tokens=False)]
    return {(xx, yy): w == c + [digits[yy // 10], digits[yy % 10]] for (xx, yy), w, c in zip(years, whole, centuries)}


@register_task("gt")
class GreaterThan(GeneratedTask):
    name = "gt"
    description = ("Greater-Than: continue 'from the year 1732 to the year 17' with a later year; "
                   "two-digit or first-digit variant by tokenizer")
    metrics = ("kl", "prob_diff", "prob_diff_10", "kendall_tau", "exact_match")
    sizes = {"train": 150, "validation": 150, "test": 12_240}

    def _generate(self, tokenizer, seed, sizes):
        variant = detect_variant(tokenizer)
        templates = read_lines("gt/templates.txt")
        nouns = read_lines("gt/nouns.txt")
        yy_low = 2 if variant == "two-digit" else 10
        yy_values = list(range(yy_low, 99))
        answer_strings = [f"{k:02d}" for k in range(100)] if variant == "two-digit" else [str(k) for k in range(10)]
        answer_tok = tokenize(tokenizer, answer_strings, add_special_tokens=False)
        if any(len(ids) != 1 for ids in answer_tok):
            raise UserError(f"gt ({variant}): the answers {answer_strings[0]}..{answer_strings[-1]} are not single tokens")
        answer_ids = torch.tensor([ids[0] for ids in answer_tok], dtype=torch.long)

        seen: set = set()
        drawn = {}
        for split in ("validation", "test", "train"):
            rng = split_rng(seed, self.name, split)

            def draw(chunk, rng=rng):
                t = rng.integers(0, len(templates), chunk)
                nn = rng.integers(0, len(nouns), chunk)
                xx = rng.integers(CENTURIES.start, CENTURIES.stop, chunk)
                yy = rng.integers(0, len(yy_values), chunk)
                return [((t[i], nn[i], xx[i], yy[i]), (int(t[i]), int(nn[i]), int(xx[i]), yy_values[yy[i]]))
                        for i in range(chunk)]

            drawn[split] = draw_unique(draw, sizes[split], seen)

        def build(items):
            clean, corrupted, texts, thresholds = [], [], [], []
            for t, nn, xx, yy in items:
                template = templates[t]
                clean.append(template.format(noun=nouns[nn], XX=xx, YY=f"{yy:02d}"))
                corrupted.append(template.format(noun=nouns[nn], XX=xx, YY=f"{CORRUPT_YY:02d}"))
                threshold = yy if variant == "two-digit" else yy // 10
                thresholds.append(threshold)
                texts.append({"clean": clean[-1], "corrupted": corrupted[-1],
                              "answer": f"> {answer_strings[threshold]}", "year": 100 * xx + yy})
            n = len(items)
            # The scored token must be exactly the next answer token in context: tokenizing the
            # prompt plus an answer must append one answer token (no merge across the boundary),
            # and the start years must split like the answers do (" 17" + "32" in two-digit).
            probe_answer = answer_strings[-1]
            with_answer = tokenize(tokenizer, [c + probe_answer for c in clean])
            prompt_ids = tokenize(tokenizer, clean)
            regular = regular_years(tokenizer, variant, {(xx, yy) for _, _, xx, yy in items} |
                                    {(xx, CORRUPT_YY) for _, _, xx, _ in items})
            keep = torch.tensor([w == p + [int(answer_ids[-1])] and regular[(xx, yy)] and regular[(xx, CORRUPT_YY)]
                                 for w, p, (_, _, xx, yy) in zip(with_answer, prompt_ids, items)],
                                dtype=torch.bool)
            targets = {
                "answer_ids": answer_ids.unsqueeze(0).expand(n, -1),
                "threshold": torch.tensor(thresholds, dtype=torch.long),
                "window": torch.full((n,), 10 if variant == "two-digit" else 1, dtype=torch.long),
            }
            return assemble(tokenizer, clean, corrupted, targets, texts, keep=keep, clean_ids=prompt_ids)

        info = {"answers": len(answer_strings), "templates": len(templates), "nouns": len(nouns),
                "start_years": f"{CENTURIES.start}{yy_values[0]:02d}..{CENTURIES.stop - 1}{yy_values[-1]:02d}"}
        return Splits(*(LazySplit(drawn[s], build) for s in ("train", "validation", "test")),
                      variant=variant, info=info)

    # ---- judging -----------------------------------------------------------------------------
    def loss(self, circuit_logits, full_logits, batch):
        return metrics.kl_divergence(full_logits, circuit_logits, restrict=batch.targets["answer_ids"])

    def objective(self, logits, batch):
        return metrics.probability_difference(logits, batch.targets["answer_ids"], batch.targets["threshold"])

    def score(self, circuit_logits, full_logits, batch):
        answers, threshold = batch.targets["answer_ids"], batch.targets["threshold"]
        return {
            "kl": metrics.kl_divergence(full_logits, circuit_logits, restrict=answers),
            "prob_diff": metrics.probability_difference(circuit_logits, answers, threshold),
            "prob_diff_10": metrics.probability_difference(circuit_logits, answers, threshold,
                                                           window=batch.targets["window"]),
            "kendall_tau": metrics.kendall_tau(metrics.restrict_logits(full_logits, answers),
                                               metrics.restrict_logits(circuit_logits, answers)),
            "exact_match": metrics.exact_match(full_logits, circuit_logits, restrict=answers),
        }
