"""`circuitbench bench engine|methods|ep-step|acdc-search [--device cuda] [--json]`: speed and memory
against the plain model (ratios and absolute times), one Edge Pruning step of any model beside its
memory estimate (``ep-step``, e.g. ``--model random:codellama-13b --device cuda --dtype bfloat16
--checkpoint --batch 1 --seq 128``), and ACDC's trials per second one by one and batched on a real
task (``acdc-search``: ``--model smollm2-135m --task ioi --n-train 4 --tau 0.01`` by default)."""
from __future__ import annotations

import json

from ..errors import UserError



def add_parser(sub):
    p = sub.add_parser("bench", help="benchmarks: ratios and absolute times measured in one run")
    p.add_argument("target", help="what to benchmark: engine, or a benchmark the methods register (the built-in "
                                  "ones: methods, ep-step, acdc-search)")
    p.add_argument("--model", help="model spec (default random:gpt2-small; acdc-search: smollm2-135m)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--dtype", help="float32 (default), bfloat16 or float16")
    p.add_argument("--checkpoint", action="store_true", help="gradient checkpointing of the masked pass")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--task", default="ioi", help="acdc-search: the task whose training split ACDC searches on")
    p.add_argument("--n-train", type=int, default=4, help="acdc-search: training examples (default 4)")
    p.add_argument("--tau", type=float, default=0.01, help="acdc-search: ACDC's threshold (default 0.01)")
    p.add_argument("--save", help="acdc-search: a folder to write both circuits to (with their increases)")
    p.set_defaults(func=run)


def run(args) -> int:
    import importlib

    if min(args.batch, args.seq, args.threads, args.repeats) < 1:
        raise UserError("--batch, --seq, --threads and --repeats must be positive")
    from ..bench import get_benchmark
    from ..models import resolve_device, resolve_dtype

    bench = get_benchmark(args.target)
    resolve_device(args.device), resolve_dtype(args.dtype)  # clean errors before anything loads
    module, name = bench.target.split(":")
    fn = getattr(importlib.import_module(module), name)
    search = bench.search
    extra = {"task": args.task, "n_train": args.n_train, "tau": args.tau, "save": args.save} if search else {}
    if search and args.n_train < 1:
        raise UserError("--n-train must be positive")
    model = args.model or bench.default_model
    result = fn(model, args.batch, args.seq, args.threads, args.repeats,
                memory=not args.no_memory, progress=not args.json, device=args.device, dtype=args.dtype,
                checkpoint=args.checkpoint, **extra)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:<34} {v:.4g}" if isinstance(v, float) else f"{k:<34} {v}")
    return 0
