"""`circuitbench bench engine|methods [--json]`: speed and memory ratios against the plain model."""
from __future__ import annotations

import json

from ..errors import UserError

# target -> "module:function" in the circuitbench package
TARGETS = {"engine": "bench:engine_benchmark", "methods": "bench_methods:methods_benchmark"}


def add_parser(sub):
    p = sub.add_parser("bench", help="benchmarks reported as ratios measured in one run")
    p.add_argument("target", choices=sorted(TARGETS), help="what to benchmark")
    p.add_argument("--model", default="random:gpt2-small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    import importlib

    if min(args.batch, args.seq, args.threads, args.repeats) < 1:
        raise UserError("--batch, --seq, --threads and --repeats must be positive")
    module, name = TARGETS[args.target].split(":")
    fn = getattr(importlib.import_module(f"circuitbench.{module}"), name)
    result = fn(args.model, args.batch, args.seq, args.threads, args.repeats,
                memory=not args.no_memory, progress=not args.json)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:<34} {v:.4g}" if isinstance(v, float) else f"{k:<34} {v}")
    return 0
