"""`circuitbench report`: rebuild every figure and table from the results store.

    circuitbench report [--results DIR] [--out DIR]
    circuitbench report --edge-faithfulness CIRCUIT.json|RUN_ID [--model SPEC] [--task NAME]
                        [--limit N] [--batch-size B] [--data-seed S] [--device D] [--dtype T]

The first form reads only the store (no method is rerun) and writes ``DIR/report/index.html``
with the figures (PNG, PDF) and tables (Markdown, CSV, LaTeX) beside it. A missing results
folder or one without ``results.db`` is an error (exit 2); a store without runs gets a page that
says so (exit 0).

``--edge-faithfulness`` first measures, for every edge e of a circuit, loss(model ‖ model − e) and
loss(model ‖ circuit − e) on the task's test split (the one step that loads the model), stores
them in the store's ``edge_faithfulness`` table (`circuitbench.faithfulness`, recorded with
`ResultsStore.record`), then rebuilds the report, which only reads the store. The circuit is a file
(model and task from ``--model``/``--task``, else from the file's meta, as the runner writes
it) or the id of a stored run (its job's model, task and data seed).
"""
from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("report", help="rebuild every figure and table (and index.html) from the results store")
    p.add_argument("--results", default="results", help="results folder (default results/)")
    p.add_argument("--out", help="output folder (default RESULTS/report)")
    p.add_argument("--edge-faithfulness", dest="edge_faithfulness", metavar="CIRCUIT",
                   help="measure per-edge faithfulness of a circuit file or stored run id, store it, then report")
    p.add_argument("--model", help="model spec for --edge-faithfulness (default: from the circuit)")
    p.add_argument("--task", help="task for --edge-faithfulness (default: from the circuit)")
    p.add_argument("--limit", type=int, default=None,
                   help="test examples for --edge-faithfulness (default 256; 0 = the whole split)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=32)
    p.add_argument("--data-seed", dest="data_seed", type=int, default=None,
                   help="data seed for --edge-faithfulness (default: the run's, else 0)")
    p.add_argument("--device", help="device for --edge-faithfulness (cpu, cuda, ...; default cpu)")
    p.add_argument("--dtype", help="dtype for --edge-faithfulness (default float32)")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _circuit_meta(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # Circuit.load reports a bad file with its own clear message
    return data.get("meta", {}) if isinstance(data, dict) and isinstance(data.get("meta"), dict) else {}


def edge_faithfulness(args) -> str:
    """Compute and store one study; returns a one-line description of what was stored."""
    import pandas as pd

    from ..circuit import Circuit
    from ..errors import UserError
    from ..faithfulness import DEFAULT_LIMIT
    from ..faithfulness import edge_faithfulness as measure
    from ..models import load_model
    from ..store import ResultsStore
    from ..tasks import get_task

    source = args.edge_faithfulness
    path = Path(source)
    run_id = None
    data_seed = args.data_seed
    sizes = {}  # a stored run's split sizes: its circuit is measured on its job's test split
    if path.is_file():
        meta = _circuit_meta(path)
        model_spec, task_name = args.model or meta.get("model"), args.task or meta.get("task")
        run_id = meta.get("run_id")
        name = run_id or path.name
    else:
        if not Path(args.results, "results.db").exists():
            raise UserError(f"{source} is neither a circuit file nor a run of a store (no store at {args.results})")
        store = ResultsStore(args.results, create=False)
        try:
            runs = store.runs()
            row = runs[runs["run_id"] == source]
            if row.empty:
                raise UserError(f"{source} is neither a circuit file nor a run id of the store at {args.results}")
            row = row.iloc[0]
            model_spec, task_name = args.model or row["model"], args.task or row["task"]
            if data_seed is None:
                data_seed = int(row["data_seed"])
            sizes = {k: None if pd.isna(row[k]) else int(row[k]) for k in ("n_train", "n_validation")}
            run_id, name = source, source
        finally:
            store.close()
    if not task_name:
        raise UserError("--task is needed: the circuit file does not name its task")
    task = get_task(task_name)
    model_spec = model_spec or getattr(task, "default_model", None)
    if not model_spec:
        raise UserError("--model is needed: the circuit file does not name its model")
    limit = DEFAULT_LIMIT if args.limit is None else (None if args.limit == 0 else args.limit)
    if limit is not None and limit < 0:
        raise UserError(f"--limit must be >= 0, got {args.limit}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    model = load_model(model_spec, device=args.device, dtype=args.dtype)
    if run_id is not None and not path.is_file():
        store = ResultsStore(args.results, create=False)
        try:
            circuit = store.circuit(run_id)
        finally:
            store.close()
        g, m = circuit.graph, model.graph
        if g != m:  # shape and block kind (a frozen dataclass compares every field)
            raise UserError(f"run {run_id}'s circuit is over another graph than {model_spec}'s")
        circuit = Circuit(m, circuit.edges, meta=circuit.meta)  # the same shape: on the model's own graph
    else:
        circuit = Circuit.load(path, model.graph)
    seed = 0 if data_seed is None else data_seed
    result = measure(model, task, circuit, model_name=model_spec, circuit_name=name, run_id=run_id,
                     circuit_file=str(path) if path.is_file() else None, limit=limit, batch_size=args.batch_size,
                     seed=seed, progress=not args.no_progress, **sizes)
    store = ResultsStore(args.results)
    try:
        store.record(result)
    finally:
        store.close()
    above = sum(c > m for c, m in zip(result.circuit_without, result.model_without))
    return (f"edge faithfulness of {name}: {len(result.edges)} edges on {result.n_examples} {task.name} "
            f"examples; {above} matter more in the circuit than in the model (stored in {args.results})")


def run(args) -> int:
    from ..report import build_report

    if args.edge_faithfulness:
        print(edge_faithfulness(args))
    elif args.model or args.task:
        from ..errors import UserError

        raise UserError("--model and --task go with --edge-faithfulness")
    summary = build_report(args.results, args.out)
    index = summary["index"]
    if summary["empty"]:
        print(f"no runs in {args.results} yet; wrote {index} saying so")
        return 0
    print(f"report of {summary['runs']} runs: {len(summary['figures'])} figures, {len(summary['tables'])} tables, "
          f"{len(summary['missing'])} without data, in {summary['seconds']:.1f} s -> {index}")
    return 0
