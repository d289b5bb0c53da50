"""circuitbench: a benchmark harness for automated circuit discovery in transformer language models.

Public API: `load_model`, `MaskedModel`, `Graph`, `Circuit`, `evaluate`, `UserError`.
"""
from .engine import CorruptedCache, MaskedModel
from .errors import UserError
from .graph import Graph
from .models import LoadedModel, load_model

__version__ = "0.1.0"

__all__ = ["CorruptedCache", "Graph", "LoadedModel", "MaskedModel", "UserError", "load_model", "__version__"]
