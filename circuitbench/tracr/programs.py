"""The two Tracr programs circuitbench ships: their input domain and their exact (RASP) semantics.

This module needs no jax: it says what each program is and computes what it should output, so
tasks can score circuits against the program's true answers. The compiled weights live in
``weights/`` (see `circuitbench.tracr.compile`, which builds the RASP programs and compiles them).

* ``xproportion`` = ``make_frac_prevs(tokens == "x")`` (tracr's library example): at every position,
  the fraction of tokens so far (inclusive) that are ``"x"``. Vocabulary {a, b, c, x}, numerical
  output, 2 layers.
* ``reverse`` = ``make_reverse(tokens)``: the input sequence reversed. Vocabulary {1, 2, 3},
  categorical output over {1, 2, 3}, 4 layers.

Inputs are at most ``max_seq_len`` = 5 tokens and are always prefixed with the ``BOS`` token, as
the compiled models require.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import UserError

BOS = "BOS"
PAD = "compiler_pad"


def frac_prevs_x(tokens: Sequence[str]) -> list[float]:
    """What ``make_frac_prevs(tokens == "x")`` computes: the running fraction of ``"x"`` tokens."""
    out, seen = [], 0
    for i, tok in enumerate(tokens):
        seen += tok == "x"
        out.append(seen / (i + 1))
    return out


def reverse(tokens: Sequence) -> list:
    """What ``make_reverse(tokens)`` computes: the sequence reversed."""
    return list(tokens)[::-1]


@dataclass(frozen=True)
class ProgramSpec:
    """One compiled program: how it was compiled and what it means.

    ``vocab`` lists the input tokens in their RASP types (strings for xproportion, ints for
    reverse); ``output`` is "numerical" (one output dimension) or "categorical" (one score per
    value in ``output_values``); ``semantics`` maps an input token list (no BOS) to the program's
    true output, one value per input token.
    """

    name: str
    description: str
    vocab: tuple
    max_seq_len: int
    output: str
    output_values: tuple | None
    semantics: Callable[[Sequence], list]

    def domain(self) -> list[tuple]:
        """Every input of the program's domain: all sequences of length 1..max_seq_len over the vocab
        (without BOS), shortest first, each length in itertools.product order."""
        return [seq for n in range(1, self.max_seq_len + 1) for seq in itertools.product(self.vocab, repeat=n)]


PROGRAMS: dict[str, ProgramSpec] = {
    "xproportion": ProgramSpec(
        name="xproportion",
        description='make_frac_prevs(tokens == "x"): running fraction of "x" tokens',
        vocab=("a", "b", "c", "x"),
        max_seq_len=5,
        output="numerical",
        output_values=None,
        semantics=frac_prevs_x,
    ),
    "reverse": ProgramSpec(
        name="reverse",
        description="make_reverse(tokens): the input sequence reversed",
        vocab=(1, 2, 3),
        max_seq_len=5,
        output="categorical",
        output_values=(1, 2, 3),
        semantics=reverse,
    ),
}


def get_program(name: str) -> ProgramSpec:
    """The program called ``name``; UserError listing the known ones otherwise."""
    try:
        return PROGRAMS[name]
    except KeyError:
        raise UserError(f"unknown Tracr program {name!r}; choose one of {', '.join(PROGRAMS)}") from None
