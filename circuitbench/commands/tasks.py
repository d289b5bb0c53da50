"""`circuitbench tasks`: list the tasks; `circuitbench tasks show NAME --model SPEC`: examples and drops."""
from __future__ import annotations

import json

from ..errors import UserError

DEFAULT_MODEL = "smollm2-135m"


def add_parser(sub):
    p = sub.add_parser("tasks", help="list the tasks, or show one task's examples for a model")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_list)
    inner = p.add_subparsers(dest="tasks_command", metavar="show")
    s = inner.add_parser("show", help="three examples of a task for a model's tokenizer, and the drop counts")
    s.add_argument("name", help="task name (see `circuitbench tasks`) or custom:PATH.jsonl")
    s.add_argument("--model", help=f"model spec whose tokenizer builds the task (default: the task's own "
                                   f"model if it has one, else {DEFAULT_MODEL})")
    s.add_argument("--split", default="test", choices=["train", "validation", "test"])
    s.add_argument("--examples", type=int, default=3, help="how many examples to print (default 3)")
    s.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    s.add_argument("--ground-truth", action="store_true",
                   help="print the task's ground-truth circuit (tasks that have one: Tracr)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=run_show)


def run_list(args) -> int:
    from ..tasks import get_task, task_names

    rows = []
    for name in task_names():
        task = get_task(name)
        rows.append({"name": name, "sizes": dict(task.sizes), "metrics": list(task.metrics),
                     "ablation": task.ablation, "description": task.description})
    if args.json:
        print(json.dumps({"tasks": rows, "custom": "custom:PATH.jsonl"}))
        return 0
    width = max([len(r["name"]) for r in rows] + [len("custom:PATH.jsonl")])
    print(f"{'task':<{width}}  {'train':>6} {'valid':>6} {'test':>7}  {'ablation':<11}  metrics")
    for r in rows:
        s = r["sizes"]
        print(f"{r['name']:<{width}}  {s['train']:>6} {s['validation']:>6} {s['test']:>7}  "
              f"{r['ablation']:<11}  {', '.join(r['metrics'])}")
    print(f"{'custom:PATH.jsonl':<{width}}  your JSONL file: clean, corrupted, answer, wrong_answer[, split] per line "
          "(README: Custom tasks)")
    print("\n`circuitbench tasks show NAME --model SPEC` prints examples and the tokenizer's drop counts.")
    return 0


def _describe_ids(tokenizer, ids) -> list[str]:
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    return convert(ids) if convert else [str(i) for i in ids]


def run_show(args) -> int:
    from ..models import load_model
    from ..tasks import get_task

    if args.examples < 0:
        raise UserError("--examples must be >= 0")
    task = get_task(args.name)
    if args.ground_truth:
        if not hasattr(task, "ground_truth"):
            raise UserError(f"task {task.name} has no ground-truth circuit (only compiled Tracr tasks do)")
        edges = list(task.ground_truth())
        if args.json:
            print(json.dumps({"task": task.name, "ground_truth": edges}))
        else:
            print(f"ground truth of {task.name}: {len(edges)} edges")
            for edge in edges:
                print(f"  {edge}")
        return 0
    spec = args.model or getattr(task, "default_model", None) or DEFAULT_MODEL
    model = load_model(spec)
    tokenizer = model.tokenizer
    splits = task.build(tokenizer, seed=args.seed)
    dropped = splits.dropped
    sizes = {name: len(splits.split(name)) for name in splits.names}
    examples = splits.split(args.split)
    shown = []
    for i in range(min(args.examples, len(examples))):
        length = int(examples.attention_mask[i].sum())
        ids = examples.clean[i, :length].tolist()
        positions = examples.positions[i].tolist()
        shown.append({**examples.texts[i], "n_tokens": length, "scored_positions": positions,
                      "scored_tokens": [_describe_ids(tokenizer, [ids[p]])[0] for p in positions]})
    out = {"task": task.name, "model": spec, "seed": args.seed, "variant": splits.variant,
           "sizes": sizes, "dropped": dropped, "metrics": list(task.metrics), "ablation": task.ablation,
           "info": splits.info, "split": args.split, "examples": shown}
    if args.json:
        print(json.dumps(out, default=str))
        return 0
    print(f"task      {task.name}: {task.description}")
    print(f"model     {spec} (its tokenizer built the examples; seed {args.seed})")
    if splits.variant:
        print(f"variant   {splits.variant}")
    print("sizes     " + ", ".join(f"{n} {sizes[n]} (dropped {dropped[n]})" for n in splits.names))
    print(f"metrics   {', '.join(task.metrics)}   (ablation: {task.ablation})")
    for key, value in splits.info.items():
        print(f"{key:<9} {value}")
    for i, ex in enumerate(shown, start=1):
        print(f"\n{args.split} example {i} ({ex['n_tokens']} tokens; scored after token(s) "
              f"{', '.join(repr(t) for t in ex['scored_tokens'])})")
        for key, value in ex.items():
            if key in ("n_tokens", "scored_positions", "scored_tokens"):
                continue
            print(f"  {key:<10} {value!r}")
    return 0
