"""`circuitbench evaluate --task NAME --model SPEC --circuit FILE|full|empty`: a circuit's metrics."""
from __future__ import annotations

import json
import time


def add_parser(sub):
    p = sub.add_parser("evaluate", help="score a circuit on a task: every metric, with the full model and "
                                        "the empty circuit for reference")
    p.add_argument("--task", required=True, help="task name (see `circuitbench tasks`) or custom:PATH.jsonl")
    p.add_argument("--model", help="model spec (random:gpt2-small, smollm2-135m, gpt2, ...); "
                                   "default: the task's own model if it has one")
    p.add_argument("--circuit", required=True,
                   help="a circuit file (circuitbench, EAP-IG/MIB or Edge Pruning JSON), 'full' or 'empty'")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--limit", type=int, help="score only the first N examples of the split")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    p.add_argument("--n-train", type=int, help="training-set size the circuit's job used (default: the task's "
                                               "own); the test split is drawn after train and validation")
    p.add_argument("--n-validation", type=int, help="validation-set size the circuit's job used (default: the "
                                                    "task's own)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--dtype", help="float32 (default), bfloat16, float16")
    p.add_argument("--no-references", action="store_true",
                   help="skip the full-model and empty-circuit reference columns (faster)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON object of metric name -> value")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import UserError
    from ..evaluate import evaluate, format_table
    from ..models import load_model
    from ..tasks import get_task

    task = get_task(args.task)
    for flag, value in (("--n-train", args.n_train), ("--n-validation", args.n_validation)):
        if value is not None and value < 0:
            raise UserError(f"{flag} must be >= 0, got {value}")
    spec = args.model or getattr(task, "default_model", None)
    if spec is None:
        raise UserError(f"--model is needed for task {task.name}")
    model = load_model(spec, device=args.device, dtype=args.dtype)
    t0 = time.perf_counter()
    values = evaluate(model, task, args.circuit, split=args.split, batch_size=args.batch_size,
                      limit=args.limit, seed=args.seed, progress=not args.no_progress,
                      references=not args.no_references, n_train=args.n_train, n_validation=args.n_validation)
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps(values))
        return 0
    print(f"task {task.name} ({args.split}, {int(values['n_examples'])} examples), model {spec}, "
          f"circuit {args.circuit}  [{seconds:.1f} s]")
    print(format_table(values, task.metrics))
    return 0
