"""Boolean Expressions (BIG-Bench Hard style, generated here): evaluate "not ( True ) and False".

Expressions have 3 to 6 literals, parentheses nested at most 3 deep and at most 2 consecutive
``not``s, written with spaces between words and parentheses as in BBH; their value is Python's
(``not`` > ``and`` > ``or``). Splits are 3,840 / 767 / 3,070 by default, half True and half False
(interleaved), no expression in two splits. Corruption: one literal flipped so the value flips (same
length in words, and checked to have the same token length).

Two prompting settings (two tasks):

* ``boolexpr-ip`` (instruction prompt):
  ``[INST] <<SYS>>\\nEvaluate the following boolean expression as either 'True' or 'False'.\\n<</SYS>>\\n\\n{expr} [/INST] '``
  -> ``True`` / ``False``;
* ``boolexpr-fs`` (few-shot): three demonstrations ``[INST] {expr} is [/INST] {answer}</s><s>``
  (drawn at random, at least one of each value) then ``[INST] {expr} is [/INST]`` -> `` True`` /
  `` False``.

These are CodeLlama-Instruct's formats, used verbatim (variant ``codellama-inst``) when the
tokenizer has no chat template or a Llama-2 ``[INST]`` one; ``</s><s>`` are the tokenizer's own
end/begin tokens. A tokenizer with another chat template gets the same messages rendered with it
(variant ``chat-template``): IP = system instruction + user expression, then the assistant turn
opened with ``'``; FS = three user/assistant exchanges then the user's question.

Metrics: KL(full ‖ circuit) over the vocabulary, logit difference (correct − other truth value),
accuracy (the correct truth value beats the other) and exact match (circuit and model pick the same
of the two truth values). The answer token is whatever the tokenizer appends for "True"/"False"
after the prompt, checked in context.
"""
from __future__ import annotations

import random

import torch

from .. import metrics
from ..errors import UserError
from . import register_task
from ._common import AnswerPairTask, assemble, draw_unique, split_random, tokenize
from .base import LazySplit, Splits

SYSTEM = "Evaluate the following boolean expression as either 'True' or 'False'."
MIN_LITERALS, MAX_LITERALS, MAX_DEPTH, MAX_NOTS = 3, 6, 3, 2
N_DEMOS = 3


# ---- expressions -----------------------------------------------------------------------------------
LITERALS = ("True", "False")
WORDS = frozenset(("True", "False", "and", "or", "not", "(", ")"))


def _nots(rng: random.Random) -> list[str]:
    r = rng.random()
    return [] if r < 0.6 else ["not"] if r < 0.9 else ["not", "not"]


def _compositions(rng: random.Random, n: int) -> list[int]:
    """``n`` literals split into 2 or 3 non-empty consecutive groups."""
    parts = rng.randint(2, min(n, 3))
    cuts = sorted(rng.sample(range(1, n), parts - 1))
    bounds = [0, *cuts, n]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


# An atom is a literal or a parenthesised group with its leading nots: (words, value, pivots), where
# pivots are the word indices of the literals whose flip flips the atom's value. A level is a flat
# run of atoms joined by "and"/"or"; its value follows Python's precedence (and binds tighter).
def _level(rng: random.Random, n: int, depth: int) -> tuple[list, list[str]]:
    if n == 1:
        nots = _nots(rng)
        literal = LITERALS[rng.getrandbits(1)]
        value = (literal == "True") != (len(nots) % 2 == 1)
        return [(nots + [literal], value, [len(nots)])], []
    atoms, ops = [], []
    for i, size in enumerate(_compositions(rng, n)):
        if i:
            ops.append("and" if rng.getrandbits(1) else "or")
        if size > 1 and depth < MAX_DEPTH and rng.random() < 0.7:
            nots = _nots(rng)
            words, value, pivots = _close(*_level(rng, size, depth + 1))
            offset = len(nots) + 1
            atoms.append((nots + ["("] + words + [")"], value != (len(nots) % 2 == 1),
                          [p + offset for p in pivots]))
        else:
            # A literal, or a group without parentheses: its atoms join this level's run.
            sub_atoms, sub_ops = _level(rng, size, depth)
            atoms += sub_atoms
            ops += sub_ops
    return atoms, ops


def _close(atoms: list, ops: list[str]) -> tuple[list[str], bool, list[int]]:
    """Words, value and pivotal literals of a run of atoms joined by ``ops``."""
    chains, current = [], [0]
    for i, op in enumerate(ops):
        if op == "or":
            chains.append(current)
            current = []
        current.append(i + 1)
    chains.append(current)
    chain_values = [all(atoms[a][1] for a in chain) for chain in chains]
    value = any(chain_values)
    starts, words = [], []
    for i, (atom_words, _, _) in enumerate(atoms):
        if i:
            words.append(ops[i - 1])
        starts.append(len(words))
        words += atom_words
    pivots = []
    for c, chain in enumerate(chains):
        # A chain's flip flips an "or" only when every other chain is False...
        if any(v for k, v in enumerate(chain_values) if k != c):
            continue
        for a in chain:
            # ...and an atom's flip flips its "and" chain only when every other atom is True.
            if all(atoms[b][1] for b in chain if b != a):
                pivots += [starts[a] + p for p in atoms[a][2]]
    return words, value, sorted(pivots)


def random_expression_with_pivots(rng: random.Random) -> tuple[list[str], bool, list[int]]:
    """A BBH-style expression (list of words), its value, and the indices of the literals whose
    flip flips the value."""
    return _close(*_level(rng, rng.randint(MIN_LITERALS, MAX_LITERALS), 0))


def random_expression(rng: random.Random) -> list[str]:
    """A BBH-style expression as a list of words ("not", "(", "True", "and", ...)."""
    return random_expression_with_pivots(rng)[0]


def evaluate_words(words: list[str]) -> bool:
    """The expression's value under Python's precedence (not > and > or), as BBH defines it."""
    if not WORDS.issuperset(words):
        raise ValueError(f"not a boolean expression: {' '.join(words)!r}")
    # Only the seven words above can reach eval, so this evaluates a boolean formula and nothing else.
    return bool(eval(" ".join(words), {"__builtins__": {}}, {}))


def max_depth(words: list[str]) -> int:
    depth = deepest = 0
    for word in words:
        depth += word == "("
        depth -= word == ")"
        deepest = max(deepest, depth)
    return deepest


def max_consecutive_nots(words: list[str]) -> int:
    run = longest = 0
    for word in words:
        run = run + 1 if word == "not" else 0
        longest = max(longest, run)
    return longest


# ---- prompts -------------------------------------------------------------------------------------
def prompt_variant(tokenizer) -> str:
    """"codellama-inst" for tokenizers without a chat template or with Llama-2's, else "chat-template"."""
    template = getattr(tokenizer, "chat_template", None)
    if not template or "[INST]" in str(template):
        return "codellama-inst"
    return "chat-template"


def _chat(tokenizer, messages) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_ip(tokenizer, variant: str, expr: str) -> str:
    if variant == "codellama-inst":
        return f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{expr} [/INST] '"
    return _chat(tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": expr}]) + "'"


def render_fs(tokenizer, variant: str, expr: str, demos: list[tuple[str, bool]]) -> str:
    if variant == "codellama-inst":
        eos, bos = tokenizer.eos_token or "", tokenizer.bos_token or ""
        shots = "".join(f"[INST] {e} is [/INST] {v}{eos}{bos}" for e, v in demos)
        return f"{shots}[INST] {expr} is [/INST]"
    messages = []
    for e, v in demos:
        messages += [{"role": "user", "content": f"{e} is"}, {"role": "assistant", "content": str(v)}]
    return _chat(tokenizer, messages + [{"role": "user", "content": f"{expr} is"}])


def _marker(i: int) -> str:
    return f"\ue000{i}\ue001"  # private-use characters: never in a template or an expression


class PromptRenderer:
    """Renders prompts fast: a chat template is rendered once with markers in place of the
    expressions and answers, and each prompt is the skeleton with the markers replaced (checked
    against a direct render of the first prompt; a template that rewrites message contents is
    rendered directly for every prompt instead)."""

    def __init__(self, tokenizer, variant: str, few_shot: bool):
        self.tokenizer, self.variant, self.few_shot = tokenizer, variant, few_shot
        self.skeleton = None
        if variant == "chat-template":
            demos = [(_marker(2 * i + 1), _marker(2 * i + 2)) for i in range(N_DEMOS)]
            self.skeleton = self.direct(_marker(0), demos)
            self.checked = False

    def direct(self, expr: str, demos) -> str:
        if self.few_shot:
            return render_fs(self.tokenizer, self.variant, expr, demos)
        return render_ip(self.tokenizer, self.variant, expr)

    def __call__(self, expr: str, demos: list[tuple[str, bool]]) -> str:
        if self.skeleton is None:
            return self.direct(expr, demos)
        text = self.skeleton.replace(_marker(0), expr)
        if self.few_shot:
            for i, (e, v) in enumerate(demos):
                text = text.replace(_marker(2 * i + 1), e).replace(_marker(2 * i + 2), str(v))
        if not self.checked:
            self.checked = True
            if text != self.direct(expr, demos):
                self.skeleton = None
                return self.direct(expr, demos)
        return text


class _BoolExpr(AnswerPairTask):
    metrics = ("kl", "logit_diff", "accuracy", "exact_match")
    sizes = {"train": 3840, "validation": 767, "test": 3070}
    few_shot: bool

    def _answer_text(self, variant: str, value: bool) -> str:
        # The codellama few-shot answer follows "[/INST]" after a space; every other prompt ends
        # where the answer word starts ("'" or the assistant's turn).
        return (" " if self.few_shot and variant == "codellama-inst" else "") + str(value)

    @staticmethod
    def _demos(rng: random.Random) -> list[tuple[str, bool]]:
        """Three demonstrations (expression, value) with both values present, in random order."""
        values = [True, False, bool(rng.getrandbits(1))]
        rng.shuffle(values)
        demos = []
        for v in values:
            words, value, pivots = random_expression_with_pivots(rng)
            while not pivots:  # a constant expression cannot be turned into the value wanted
                words, value, pivots = random_expression_with_pivots(rng)
            if value != v:  # flipping a pivotal literal gives the value wanted
                words = list(words)
                words[pivots[0]] = "False" if words[pivots[0]] == "True" else "True"
            demos.append((" ".join(words), v))
        return demos

    def _generate(self, tokenizer, seed, sizes):
        variant = prompt_variant(tokenizer)
        # Prompts rendered by a chat template carry their own special tokens.
        special = variant == "codellama-inst"
        seen: set = set()
        drawn = {}
        for split in ("validation", "test", "train"):
            by_value = {}
            for target in (True, False):
                stream = f"{split}/{target}"
                rng = split_random(seed, self.name, stream)
                demo_rng = split_random(seed, self.name, f"{stream}/demos")

                def draw(chunk, rng=rng, demo_rng=demo_rng, target=target):
                    out = []
                    while len(out) < chunk:
                        words, value, pivots = random_expression_with_pivots(rng)
                        if not pivots:  # no single flip changes the value: no corruption exists
                            continue
                        flipped = list(words)
                        i = pivots[rng.randrange(len(pivots))]
                        flipped[i] = "False" if words[i] == "True" else "True"
                        if value != target:  # the flipped twin has the value wanted
                            words, flipped = flipped, words
                        demos = self._demos(demo_rng) if self.few_shot else []
                        clean = " ".join(words)
                        out.append((clean, (clean, " ".join(flipped), target, demos)))
                    return out

                n = (sizes[split] + 1) // 2 if target else sizes[split] // 2
                by_value[target] = draw_unique(draw, n, seen, chunk=256)
            # Interleaved, so every split (and any prefix of it) is balanced between True and False.
            t, f = by_value[True], by_value[False]
            drawn[split] = [x for pair in zip(t, f) for x in pair] + t[len(f):]

        def answer_ids(prompt: str) -> dict[bool, int]:
            """The token each truth value appends to ``prompt``; UserError unless exactly one."""
            base = tokenize(tokenizer, [prompt], special)[0]
            out = {}
            for value in (True, False):
                ids = tokenize(tokenizer, [prompt + self._answer_text(variant, value)], special)[0]
                if len(ids) != len(base) + 1 or ids[:len(base)] != base:
                    raise UserError(f"{self.name}: the answer {self._answer_text(variant, value)!r} is not one "
                                    f"token after the prompt for this tokenizer")
                out[value] = ids[-1]
            return out

        def build(items):
            render = PromptRenderer(tokenizer, variant, self.few_shot)
            clean = [render(e, demos) for e, _, _, demos in items]
            corrupted = [render(f, demos) for _, f, _, demos in items]
            ids = answer_ids(clean[0]) if clean else {True: 0, False: 0}
            # The answer token depends only on the prompt's fixed ending; confirm on a few more.
            for prompt in clean[1:8]:
                if answer_ids(prompt) != ids:
                    raise UserError(f"{self.name}: the answer tokens change with the expression for this tokenizer")
            answers = [ids[v] for _, _, v, _ in items]
            wrongs = [ids[not v] for _, _, v, _ in items]
            texts = [{"clean": c, "corrupted": k, "answer": self._answer_text(variant, v),
                      "wrong": self._answer_text(variant, not v), "expression": e}
                     for c, k, (e, _, v, _) in zip(clean, corrupted, items)]
            targets = {"answer": torch.tensor(answers, dtype=torch.long),
                       "wrong": torch.tensor(wrongs, dtype=torch.long)}
            return assemble(tokenizer, clean, corrupted, targets, texts, add_special_tokens=special)

        return Splits(*(LazySplit(drawn[s], build) for s in ("train", "validation", "test")),
                      variant=variant, info={"prompt": "few-shot" if self.few_shot else "instruction"})

    def score(self, circuit_logits, full_logits, batch):
        answer, wrong = batch.targets["answer"], batch.targets["wrong"]
        # The model's prediction is its choice between the two truth values.
        choices = torch.stack([answer, wrong], dim=1)
        return {
            "kl": metrics.kl_divergence(full_logits, circuit_logits),
            "logit_diff": metrics.logit_difference(circuit_logits, answer, wrong),
            "accuracy": metrics.accuracy(circuit_logits, answer, wrong),
            "exact_match": metrics.exact_match(full_logits, circuit_logits, restrict=choices),
        }


@register_task("boolexpr-ip")
class BoolExprInstruction(_BoolExpr):
    name = "boolexpr-ip"
    description = "Boolean expressions, instruction prompt (CodeLlama-Instruct format or the model's chat template)"
    few_shot = False


@register_task("boolexpr-fs")
class BoolExprFewShot(_BoolExpr):
    name = "boolexpr-fs"
    description = "Boolean expressions, three-shot prompt (CodeLlama-Instruct format or the model's chat template)"
    few_shot = True
