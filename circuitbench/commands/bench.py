"""`circuitbench bench engine|methods|ep-step [--device cuda] [--json]`: speed and memory against the
plain model (ratios and absolute times), and one Edge Pruning step of any model beside its memory
estimate (``ep-step``, e.g. ``--model random:codellama-13b --device cuda --dtype bfloat16 --checkpoint
--batch 1 --seq 128``)."""
from __future__ import annotations

import json

from ..errors import UserError

# target -> "module:function" in the circuitbench package
TARGETS = {"engine": "bench:engine_benchmark", "methods": "bench_methods:methods_benchmark",
           "ep-step": "bench_methods:ep_step_benchmark"}


def add_parser(sub):
    p = sub.add_parser("bench", help="benchmarks: ratios and absolute times measured in one run")
    p.add_argument("target", choices=sorted(TARGETS), help="what to benchmark")
    p.add_argument("--model", default="random:gpt2-small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--dtype", help="float32 (default), bfloat16 or float16")
    p.add_argument("--checkpoint", action="store_true", help="gradient checkpointing of the masked pass")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    import importlib

    if min(args.batch, args.seq, args.threads, args.repeats) < 1:
        raise UserError("--batch, --seq, --threads and --repeats must be positive")
    module, name = TARGETS[args.target].split(":")
    from ..models import resolve_device, resolve_dtype

    resolve_device(args.device), resolve_dtype(args.dtype)  # clean errors before anything loads
    fn = getattr(importlib.import_module(f"circuitbench.{module}"), name)
    result = fn(args.model, args.batch, args.seq, args.threads, args.repeats,
                memory=not args.no_memory, progress=not args.json, device=args.device, dtype=args.dtype,
                checkpoint=args.checkpoint)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:<34} {v:.4g}" if isinstance(v, float) else f"{k:<34} {v}")
    return 0
