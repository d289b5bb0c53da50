"""What a job runs on in this process: the loaded model and its engine, and the facts a job
records about where it ran.

A worker process keeps one model and its `MaskedModel` between jobs (`model_and_engine`; loading
another one drops the first); `preload` puts in a model built elsewhere (sharded over GPUs by
`circuitbench.distributed`). `library_versions` and `device_name` are the environment a job record
states.
"""
from __future__ import annotations

import os
import platform

import numpy as np

_LOADED: dict = {}


def model_and_engine(spec: str, device: str, dtype: str):
    from .engine import MaskedModel
    from .models import load_model

    key = (spec, device, dtype)
    if key not in _LOADED:
        _LOADED.clear()  # one model in memory at a time
        model = load_model(spec, device=device, dtype=dtype)
        _LOADED[key] = (model, MaskedModel(model))
    return _LOADED[key]


def preload(spec: str, device: str, dtype: str, model, engine) -> None:
    """Run this process's jobs on (spec, device, dtype) with ``model`` and ``engine`` (a model built
    elsewhere, e.g. sharded over GPUs by `circuitbench.distributed`) instead of loading it."""
    _LOADED.clear()
    _LOADED[(spec, device, dtype)] = (model, engine)


def library_versions() -> dict:
    import torch
    import transformers

    from . import __version__

    return {"python": platform.python_version(), "circuitbench": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__}


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"
