"""Model specs -> a loaded model with its adapter and edge graph.

Specs:
- ``random:gpt2-small`` / ``random:gpt2-tiny`` / ``random:llama-tiny`` / ``random:qwen2-tiny``:
  seeded random weights of a named shape (qwen2-tiny's q/k/v biases are drawn too, not left at
  transformers' zero init), for tests and speed benchmarks;
  ``random:neox-tiny`` / ``random:neox-seq-tiny``: GPT-NeoX (Pythia) shapes with partial rotary
  embeddings and a parallel / sequential residual, every bias drawn. They use the SmolLM2
  tokenizer when one is needed, or with ``CIRCUITBENCH_RANDOM_TOKENIZER=synthetic`` a tokenizer
  built offline from the task source files (`synthetic_tokenizer`), so they need no download;
- ``random:codellama-13b``: CodeLlama-13B's shape (40 layers, 40 heads, d_model 5120), built
  directly on the target device in the target dtype (about 26 GB in bfloat16; never on the CPU
  first, never downloaded), always with the synthetic tokenizer (its vocabulary has 32,016
  tokens); for measuring a real-sized step on one GPU (``scripts/gpu-check``);
- ``random:gemma2-tiny`` / ``random:gemma3-tiny``: Gemma 2 (attention and final logit soft-capping)
  and Gemma 3 (q/k norms, per-layer-type rotary) shapes with grouped-query attention and a
  sliding window of 3 tokens on one of their two layers; every RMSNorm weight is drawn (Gemma's
  norms scale by 1 + w, and transformers initialises w = 0);
- ``smollm2-135m``: the real SmolLM2-135M-Instruct, embedded offline (see `smollm2`);
- ``gemma3-270m``: the real Gemma 3 270M, embedded offline (see `gemma3_270m`; the Gemma Terms of
  Use apply to its weights);
- ``tracr:xproportion`` / ``tracr:reverse``: compiled Tracr programs (see `circuitbench.tracr`);
- a Hugging Face id or a local ``save_pretrained`` folder of the GPT-2, Llama (Mistral), Qwen2
  (Qwen2.5) or GPT-NeoX (Pythia) families.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UserError, UnsupportedModel
from ..graph import Graph

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64, "fp64": torch.float64, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}

# name -> (family, config kwargs). Tiny shapes keep tests fast; gpt2-small matches GPT-2 small.
RANDOM_SHAPES = {
    "gpt2-small": ("gpt2", dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)),
    "gpt2-tiny": ("gpt2", dict(n_layer=2, n_head=4, n_embd=64, vocab_size=49152, n_positions=256,
                               bos_token_id=0, eos_token_id=0,
                               initializer_range=0.1)),
    "llama-tiny": ("llama", dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 hidden_size=64, intermediate_size=128, vocab_size=49152,
                                 max_position_embeddings=256, tie_word_embeddings=False,
                                 initializer_range=0.1)),
    "qwen2-tiny": ("qwen2", dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 hidden_size=64, intermediate_size=128, vocab_size=49152,
                                 max_position_embeddings=256, tie_word_embeddings=False,
                                 initializer_range=0.1)),
    # Pythia's layout: parallel residual, rotary on a quarter of each head's dimensions
    "neox-tiny": ("neox", dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64,
                               intermediate_size=128, vocab_size=49152, max_position_embeddings=256,
                               rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False,
                               initializer_range=0.1)),
    "neox-seq-tiny": ("neox", dict(num_hidden_layers=2, num_attention_heads=4, hidden_size=64,
                                   intermediate_size=128, vocab_size=49152, max_position_embeddings=256,
                                   rotary_pct=0.25, use_parallel_residual=False, tie_word_embeddings=False,
                                   initializer_range=0.1)),
    # Gemma: head_dim * heads != d_model, query_pre_attn_scalar != head_dim, tied embeddings; soft caps
    # low enough to bite at these weights' scale; a window of 3 tokens on one layer of two
    "gemma2-tiny": ("gemma2", dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   hidden_size=64, head_dim=24, intermediate_size=128, vocab_size=49152,
                                   max_position_embeddings=256, query_pre_attn_scalar=32,
                                   attn_logit_softcapping=1.0, final_logit_softcapping=2.0, sliding_window=3,
                                   layer_types=["full_attention", "sliding_attention"],
                                   initializer_range=0.1)),
    "gemma3-tiny": ("gemma3", dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   hidden_size=64, head_dim=24, intermediate_size=128, vocab_size=49152,
                                   max_position_embeddings=256, query_pre_attn_scalar=32, sliding_window=3,
                                   layer_types=["sliding_attention", "full_attention"],
                                   initializer_range=0.1)),
    # CodeLlama-13B(-Instruct)'s published shape (no grouped-query attention)
    "codellama-13b": ("llama", dict(num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                                    hidden_size=5120, intermediate_size=13824, vocab_size=32016,
                                    max_position_embeddings=16384, rope_theta=1_000_000.0, rms_norm_eps=1e-5,
                                    tie_word_embeddings=False)),
}
# Shapes too large to build on the CPU and move: built on the target device in the target dtype
# (so their weights differ from a CPU build's under the same seed).
RANDOM_ON_DEVICE = ("codellama-13b",)
# The tokenizer of each random shape: "smollm2" (default; overridden by the environment variable
# below) or "synthetic" (`synthetic_tokenizer`: offline, built from the task source files).
RANDOM_TOKENIZERS = {"codellama-13b": "synthetic"}
RANDOM_TOKENIZER_ENV = "CIRCUITBENCH_RANDOM_TOKENIZER"
# The parameters of a random shape drawn instead of transformers' zero init, by name ending: the
# q/k/v biases (qwen2), every bias of GPT-NeoX (its output and MLP biases, its norms' shifts), every
# RMSNorm weight of Gemma (its norms scale by 1 + w).
QKV_BIASES = ("q_proj.bias", "k_proj.bias", "v_proj.bias")
RANDOM_BIASES = {"neox": (".bias",), "gemma2": ("norm.weight",), "gemma3": ("norm.weight",)}
EMBEDDED = ("smollm2-135m", "gemma3-270m")
TRACR_PROGRAMS = ("xproportion", "reverse")
# hub ids whose config is known offline: the random shape of the same published config
KNOWN_CONFIGS = {"codellama/CodeLlama-13b-Instruct-hf": "codellama-13b", "codellama/CodeLlama-13b-hf": "codellama-13b"}
SUPPORTED_TYPES = {"gpt2": "gpt2", "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt_neox": "neox",
                   "gemma2": "gemma", "gemma3_text": "gemma", "gemma3": "gemma"}


@dataclass
class LoadedModel:
    """A model ready for the engine: its adapter, graph, tokenizer and (if any) transformers model."""

    spec: str
    adapter: Any
    hf_model: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    _tokenizer: Any = None
    _tokenizer_loader: Any = None

    @property
    def graph(self) -> Graph:
        return self.adapter.graph

    @property
    def tokenizer(self):
        if self._tokenizer is None and self._tokenizer_loader is not None:
            self._tokenizer = self._tokenizer_loader()
        return self._tokenizer

    @property
    def family(self) -> str:
        return self.adapter.family

    def describe(self) -> dict:
        return {"spec": self.spec, "family": self.family, "device": str(self.device),
                "dtype": str(self.dtype).replace("torch.", ""), **self.graph.summary()}


def resolve_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(sorted(set(DTYPES)))}") from None


def resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"unknown device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but CUDA is not available on this machine")
    return dev


def _adapter_for(hf_model):
    mt = getattr(hf_model.config, "model_type", None)
    family = SUPPORTED_TYPES.get(mt)
    if family == "gpt2":
        from ..adapters.gpt2 import GPT2Adapter
        return GPT2Adapter(hf_model)
    if family == "llama":
        from ..adapters.llama import LlamaAdapter
        return LlamaAdapter(hf_model)
    if family == "qwen2":
        from ..adapters.qwen2 import Qwen2Adapter
        return Qwen2Adapter(hf_model)
    if family == "neox":
        from ..adapters.neox import NeoXAdapter
        return NeoXAdapter(hf_model)
    if family == "gemma":
        from ..adapters.gemma import GemmaAdapter
        return GemmaAdapter(hf_model)
    raise UserError(f"unsupported architecture {mt!r}: circuitbench supports "
                    f"{', '.join(sorted(SUPPORTED_TYPES))} models")


def check_family(model_type, spec: str) -> None:
    """Raise `UserError` naming the family and the supported ones when ``model_type`` (a Hugging
    Face config's) has no adapter."""
    if SUPPORTED_TYPES.get(model_type) is None:
        raise UnsupportedModel(f"unsupported architecture {model_type!r} for {spec!r}: circuitbench "
                        f"supports {', '.join(sorted(SUPPORTED_TYPES))} models")


def _freeze(hf_model, device, dtype):
    hf_model.to(device=device, dtype=dtype)
    hf_model.eval()
    hf_model.requires_grad_(False)
    return hf_model


def embedded_module(spec: str):
    """The loader module of embedded model ``spec`` (`smollm2`, `gemma3_270m`): each has
    ``is_converted()``, ``ensure_converted()`` and ``load(device, dtype) -> (model, tokenizer)``."""
    if spec == "gemma3-270m":
        from . import gemma3_270m as module
    elif spec == "smollm2-135m":
        from . import smollm2 as module
    else:
        raise UserError(f"{spec!r} is not an embedded model ({', '.join(EMBEDDED)})")
    return module


def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    from .smollm2 import ensure_converted
    return AutoTokenizer.from_pretrained(str(ensure_converted()))


def random_tokenizer(name) -> str:
    """Which tokenizer random shape ``name`` uses: "smollm2" or "synthetic" (see `RANDOM_TOKENIZERS`
    and the environment variable `RANDOM_TOKENIZER_ENV`)."""
    choice = os.environ.get(RANDOM_TOKENIZER_ENV, "").strip().lower() or "smollm2"
    if choice not in ("smollm2", "synthetic"):
        raise UserError(f"{RANDOM_TOKENIZER_ENV}={choice!r}: choose smollm2 or synthetic")
    return RANDOM_TOKENIZERS.get(name, choice)


def _random_tokenizer_loader(name):
    """The tokenizer loader of random shape ``name`` (`random_tokenizer`)."""
    if random_tokenizer(name) == "synthetic":
        from .synthetic_tokenizer import synthetic_tokenizer
        return synthetic_tokenizer

    def smollm2():
        try:
            return _smollm2_tokenizer()
        except UserError as err:
            raise UserError(f"{err}; or set {RANDOM_TOKENIZER_ENV}=synthetic to give random models a "
                            f"tokenizer built offline from the task files") from None
    return smollm2


def random_config(name):
    """The transformers config of random shape ``name`` (no weights)."""
    if name not in RANDOM_SHAPES:
        raise UserError(f"unknown random model {name!r}; choose one of "
                        f"{', '.join('random:' + n for n in RANDOM_SHAPES)}")
    family, kwargs = RANDOM_SHAPES[name]
    import transformers
    config = {"gpt2": "GPT2Config", "llama": "LlamaConfig", "qwen2": "Qwen2Config",
              "neox": "GPTNeoXConfig", "gemma2": "Gemma2Config", "gemma3": "Gemma3TextConfig"}[family]
    return getattr(transformers, config)(**kwargs)


def _random_class(name):
    """The transformers causal-LM class of random shape ``name``."""
    import transformers
    family = RANDOM_SHAPES[name][0]
    return getattr(transformers, {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                                  "qwen2": "Qwen2ForCausalLM", "neox": "GPTNeoXForCausalLM",
                                  "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}[family])


def random_graph(name) -> Graph:
    """The edge graph of random shape ``name``, from its config alone (nothing allocated)."""
    cfg = random_config(name)
    if RANDOM_SHAPES[name][0] == "gpt2":
        return Graph(cfg.n_layer, cfg.n_head, None, True)
    if RANDOM_SHAPES[name][0] == "neox":
        return Graph(cfg.num_hidden_layers, cfg.num_attention_heads, None, True, bool(cfg.use_parallel_residual))
    return Graph(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, True)


def _free_bytes(device) -> int | None:
    """Memory free for new tensors on ``device`` (CUDA: the driver's count; CPU: MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _random_model_on_device(name, cfg, seed, device, dtype):
    """Build a large random model directly on ``device`` in ``dtype`` (never a float32 CPU copy)."""
    cls = _random_class(name)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in cls(cfg).parameters())
    need, free = n_params * torch.finfo(dtype).bits // 8, _free_bytes(device)
    if free is not None and need > free:
        raise UserError(f"random:{name} needs {need / 2**30:.1f} GiB for its {n_params / 1e9:.1f}B weights in "
                        f"{str(dtype).replace('torch.', '')} on {device}; only {free / 2**30:.1f} GiB are free")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                hf = cls(cfg)
        finally:
            torch.set_default_dtype(default)
    return _freeze(hf, device, dtype)


def _random_model(name, seed, device, dtype):
    cfg = random_config(name)
    if name in RANDOM_ON_DEVICE:
        return _random_model_on_device(name, cfg, seed, device, dtype)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        hf = _random_class(name)(cfg)
        with torch.no_grad():  # transformers zero-inits biases; draw them so they are exercised
            for pname, p in hf.named_parameters():
                if pname.endswith(RANDOM_BIASES.get(RANDOM_SHAPES[name][0], QKV_BIASES)):
                    p.normal_(0.0, cfg.initializer_range)
    finally:
        torch.random.set_rng_state(gen_state)
    return _freeze(hf, device, dtype)


def _hub_model(spec, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    looks_local = spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").split("/", 1)[-1]
    if looks_local and not os.path.isdir(os.path.expanduser(spec)):
        raise UserError(f"model folder {spec!r} does not exist")
    path = os.path.expanduser(spec) if os.path.isdir(os.path.expanduser(spec)) else spec
    try:
        try:  # the local cache first: no network round trips for models already downloaded
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except OSError:
            if path == spec and not _hub_reachable():
                raise UserError(f"model {spec!r} is not a local folder, not an embedded or random/tracr "
                                f"spec, not in the Hugging Face cache, and the hub cannot be reached") from None
            config = AutoConfig.from_pretrained(path)
    except UserError:
        raise
    except Exception as err:  # transformers raises OSError/ValueError/HTTP errors for unknown ids
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"unknown model {spec!r}: not a random:/tracr: spec, not an embedded model "
                        f"({', '.join(EMBEDDED)}), and transformers could not load it ({first})") from None
    check_family(config.model_type, spec)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return _freeze(hf, device, dtype), (lambda: AutoTokenizer.from_pretrained(path))


def _hub_reachable(timeout=3.0) -> bool:
    """Whether the Hugging Face endpoint resolves and accepts a connection (fails fast offline,
    instead of the hub client's minute of retries)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class ModelSpec:
    """A model spec, read once: ``kind`` is "random", "tracr", "embedded" or "hub" (a Hugging Face
    id or a local folder) and ``name`` names the model within its kind (``gpt2-tiny`` of
    ``random:gpt2-tiny``; the spec itself otherwise). What a spec means is decided here: loading it
    (`load`), checking it without loading weights (`check`), its transformers config (`config`)."""

    spec: str
    kind: str
    name: str

    @classmethod
    def parse(cls, spec) -> "ModelSpec":
        if not isinstance(spec, str) or not spec.strip():
            raise UserError("model spec must be a non-empty string")
        spec = spec.strip()
        for kind in ("random", "tracr"):
            if spec.startswith(kind + ":"):
                return cls(spec, kind, spec.split(":", 1)[1])
        return cls(spec, "embedded" if spec in EMBEDDED else "hub", spec)

    @property
    def known_random(self) -> bool:
        """A random model of a named shape (`RANDOM_SHAPES`)."""
        return self.kind == "random" and self.name in RANDOM_SHAPES

    def check(self) -> None:
        """Raise `UserError` for a spec that cannot be loaded, without loading any weights."""
        spec = self.spec
        if self.kind == "random":
            if not self.known_random:
                raise UserError(f"unknown model {spec!r}; random models: "
                                f"{', '.join('random:' + n for n in RANDOM_SHAPES)}")
            return
        if self.kind == "tracr":
            if self.name not in TRACR_PROGRAMS:
                raise UserError(f"unknown model {spec!r}; Tracr programs: "
                                f"{', '.join('tracr:' + n for n in TRACR_PROGRAMS)}")
            return
        if self.kind == "embedded":
            return
        path = os.path.expanduser(spec)
        if os.path.isdir(path):
            config_file = os.path.join(path, "config.json")
            if not os.path.exists(config_file):
                raise UserError(f"model folder {spec!r} has no config.json")
            try:
                with open(config_file) as f:
                    model_type = json.load(f).get("model_type")
            except (OSError, ValueError, AttributeError) as err:
                raise UserError(f"model folder {spec!r}: config.json cannot be read ({err})") from None
            check_family(model_type, spec)
            return
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(spec, local_files_only=True)
        except Exception:  # not in the cache: asked of the hub below
            config = None
        if config is not None:
            check_family(config.model_type, spec)
            return
        if spec.startswith((".", "/", "~")):
            raise UserError(f"unknown model {spec!r}: no such folder")
        if not _hub_reachable():
            raise UserError(f"unknown model {spec!r}: not a random:/tracr: spec, not an embedded model "
                            f"({', '.join(EMBEDDED)}), not in the Hugging Face cache, and the hub "
                            f"cannot be reached")
        try:
            config = AutoConfig.from_pretrained(spec)
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(f"unknown model {spec!r}: {first}") from None
        check_family(config.model_type, spec)

    def config(self):
        """The transformers config without loading weights, or None when it is unknown offline (a
        Tracr program; a hub id not in the cache)."""
        if self.spec in KNOWN_CONFIGS:
            return random_config(KNOWN_CONFIGS[self.spec])
        if self.kind == "random":
            return random_config(self.name) if self.known_random else None
        if self.spec == "smollm2-135m":
            from transformers import LlamaConfig

            return LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                               intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)
        if self.kind == "tracr":
            return None
        try:
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(os.path.expanduser(self.spec), local_files_only=True)
        except Exception:  # not cached: None, as documented
            return None

    def load(self, device=None, dtype=None, seed: int = 0) -> "LoadedModel":
        device = resolve_device(device if device is not None else "cpu")
        dtype = resolve_dtype(dtype)
        spec = self.spec
        if self.kind == "random":
            loader = _random_tokenizer_loader(self.name) if self.known_random else None
            hf = _random_model(self.name, seed, device, dtype)
            return LoadedModel(spec, _adapter_for(hf), hf, device, dtype, _tokenizer_loader=loader)
        if self.kind == "tracr":
            if self.name not in TRACR_PROGRAMS:
                raise UserError(f"unknown Tracr program {self.name!r}; choose one of "
                                f"{', '.join('tracr:' + n for n in TRACR_PROGRAMS)}")
            from ..tracr import load_tracr
            adapter, tokenizer = load_tracr(self.name, device=device, dtype=dtype)
            return LoadedModel(spec, adapter, None, device, dtype, _tokenizer=tokenizer)
        if self.kind == "embedded":
            hf, tok = embedded_module(spec).load(device=device, dtype=dtype)
            return LoadedModel(spec, _adapter_for(_freeze(hf, device, dtype)), hf, device, dtype, _tokenizer=tok)
        hf, tok_loader = _hub_model(spec, device, dtype)
        return LoadedModel(spec, _adapter_for(hf), hf, device, dtype, _tokenizer_loader=tok_loader)


def load_model(spec: str, device=None, dtype=None, seed: int = 0) -> LoadedModel:
    """Load a model spec (see the module docstring and `ModelSpec`). Bad specs raise `UserError`."""
    return ModelSpec.parse(spec).load(device, dtype, seed)
