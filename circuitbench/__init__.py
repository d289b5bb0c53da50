"""circuitbench: a benchmark harness for automated circuit discovery in transformer language models.

Public API: `load_model`, `MaskedModel` (and its `PassState`), `Graph`, `Circuit`, `evaluate`, `UserError`.
"""
from .engine import CorruptedCache, MaskedModel, PassState
from .circuit import Circuit
from .errors import UserError
from .evaluate import evaluate
from .graph import Graph
from .models import LoadedModel, load_model

__version__ = "0.1.0"

__all__ = ["Circuit", "CorruptedCache", "Graph", "evaluate", "LoadedModel", "MaskedModel", "PassState", "UserError", "load_model", "__version__"]
