"""Compiled Tracr programs (Lindner et al. 2023): transformers whose circuits are known exactly.

Two programs from tracr's library, compiled with ``tracr-pypi`` and committed as small weight files
(``weights/``), so nothing here needs jax:

* ``xproportion`` = ``make_frac_prevs(tokens == "x")`` over {a, b, c, x}, numerical output;
* ``reverse`` = ``make_reverse(tokens)`` over {1, 2, 3}, categorical output.

API:

* ``load_tracr(name, device=None, dtype=None) -> (TracrAdapter, TracrTokenizer)``; what
  ``circuitbench.load_model("tracr:NAME")`` uses.
* ``ground_truth(name) -> list[str]``: the ground-truth edge names (``m0->a1.h0<v>``), derived from
  the compiler's allocation (see `circuitbench.tracr.ground_truth`);
  ``ground_truth_directions(name)`` adds the residual directions each edge carries.
* ``PROGRAMS`` / ``get_program(name)``: the programs' vocabularies, domains and true outputs.

Regenerate the weights with ``python -m circuitbench.tracr.compile --out circuitbench/tracr/weights``.
"""
from .adapter import TracrAdapter, TracrTokenizer, load_tracr
from .ground_truth import component_spaces, ground_truth, ground_truth_directions
from .programs import PROGRAMS, ProgramSpec, get_program

__all__ = ["PROGRAMS", "ProgramSpec", "TracrAdapter", "TracrTokenizer", "component_spaces", "get_program",
           "ground_truth", "ground_truth_directions", "load_tracr"]
