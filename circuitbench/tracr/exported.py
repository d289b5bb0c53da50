"""Reading the committed Tracr exports in ``weights/`` (no jax needed).

Each program NAME has ``NAME.npz`` (weights), ``NAME.json`` (metadata: vocabulary, output space,
residual basis labels, allocated components and the residual directions they read and write)
and ``NAME.reference.npz`` (Tracr's own outputs on the whole domain). `circuitbench.tracr.compile`
writes them; its docstring describes every field.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from .programs import get_program

WEIGHTS_DIR = Path(__file__).parent / "weights"
REGENERATE = "python -m circuitbench.tracr.compile --out circuitbench/tracr/weights (needs tracr-pypi)"


def _path(name: str, suffix: str) -> Path:
    get_program(name)  # UserError for unknown names
    path = WEIGHTS_DIR / f"{name}{suffix}"
    if not path.is_file():
        raise FileNotFoundError(f"missing Tracr export {path}; regenerate it with {REGENERATE}")
    return path


@lru_cache(maxsize=None)
def load_metadata(name: str) -> dict:
    """The metadata dict of program ``name`` (see `circuitbench.tracr.compile`)."""
    return json.loads(_path(name, ".json").read_text())


def load_arrays(name: str) -> dict[str, np.ndarray]:
    """The compiled weights of program ``name``: float32 arrays keyed as in ``NAME.npz``."""
    with np.load(_path(name, ".npz")) as data:
        return {k: data[k] for k in data.files}


def load_reference(name: str) -> dict[str, np.ndarray]:
    """Tracr's own outputs on every input of the domain (see `compile.reference_outputs`)."""
    with np.load(_path(name, ".reference.npz")) as data:
        return {k: data[k] for k in data.files}
