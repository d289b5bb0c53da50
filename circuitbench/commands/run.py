"""`circuitbench run`: run a sweep of circuit discovery jobs into a results folder.

    python -m circuitbench run --methods ep,acdc,eap --task gt
    python -m circuitbench run --preset quick --dry-run
    python -m circuitbench run --config my_sweep.toml --jobs 2

Every key of a sweep file has a flag here (see `circuitbench.sweep`); flags override the file,
which overrides the preset. Rerunning the same command resumes: complete jobs are skipped.
"""
from __future__ import annotations

from ..errors import UserError


def add_parser(sub):
    p = sub.add_parser("run", help="run a sweep of methods x tasks x models x sparsities (resumable)",
                       description="Run circuit discovery jobs and record them in a results store. "
                                   "Rerunning the same command skips complete jobs.")
    p.add_argument("--methods", help="comma list of methods (see `circuitbench methods`), e.g. ep,acdc,eap")
    p.add_argument("--task", "--tasks", dest="tasks",
                   help="task name or comma list, e.g. gt or ioi,gt; your own file: custom:PATH.jsonl")
    p.add_argument("--model", "--models", dest="models",
                   help="model spec or comma list (default smollm2-135m; Tracr tasks use their own model)")
    p.add_argument("--sparsities", help="comma list (0.9,0.95) or range start:stop:step (0.9:0.99:0.01), each in "
                                        "[0, 1); 'mib': MIB's circuit sizes, 0.1%% to 50%% of the edges")
    p.add_argument("--n-train", dest="n_train", help="training-set sizes, comma list (default: the task's own)")
    p.add_argument("--n-validation", dest="n_validation", type=int, help="validation-set size (default: the task's own)")
    p.add_argument("--seeds", help="method seeds, comma list (default 0)")
    p.add_argument("--data-seed", dest="data_seed", type=int, help="seed of the task's data (default 0)")
    p.add_argument("--preset", help="named sweep: smoke (seconds, CI), quick (the comparison shrunk for a CPU, "
                                    "on smollm2-135m), paper (the Edge Pruning paper's protocol); "
                                    "configs/NAME.toml; see them with --dry-run")
    p.add_argument("--config", help="a sweep TOML file with the same keys as these flags")
    p.add_argument("--method-preset", dest="method_preset",
                   help="which preset of every method to use (default: the sweep preset's name, else paper)")
    p.add_argument("--set", dest="set_values", action="append", metavar="METHOD.FIELD=VALUE",
                   help="override one method hyperparameter, e.g. --set ep.steps=500 (repeatable)")
    p.add_argument("--cut", choices=["effective", "edges"],
                   help="how a score method's ranking is cut at a sparsity: the top edges until that many are "
                        "effective, on an input -> logits path (default), or the top edges")
    p.add_argument("--eval-limit", dest="eval_limit", type=int,
                   help="evaluate each circuit on the first N test examples (default: the whole test split)")
    p.add_argument("--eval-batch-size", dest="eval_batch_size", type=int, help="evaluation batch size (default 32)")
    p.add_argument("--results", help="results folder (default results/)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 or auto (default: auto, a GPU when there is one)")
    p.add_argument("--dtype", help="float32 (default), bfloat16 or float16")
    p.add_argument("--jobs", type=int, help="worker processes (default 1: in this process)")
    p.add_argument("--backend", choices=["local", "dask", "ray"],
                   help="local (default), or an existing Dask / Ray cluster through joblib's backends")
    p.add_argument("--cluster", help="address of the Dask scheduler or Ray cluster (default: Dask's configured "
                                     "scheduler or a local one; Ray's 'auto')")
    p.add_argument("--dry-run", action="store_true", help="print the job plan and a time estimate; run nothing")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..runner import run_sweep
    from ..sweep import Sweep, parse_set

    flags = {"methods": args.methods, "tasks": args.tasks, "models": args.models,
             "sparsities": args.sparsities, "n_train": args.n_train, "n_validation": args.n_validation,
             "seeds": args.seeds, "data_seed": args.data_seed, "method_preset": args.method_preset,
             "eval_limit": args.eval_limit, "eval_batch_size": args.eval_batch_size, "cut": args.cut}
    if args.set_values:
        flags["method_config"] = parse_set(args.set_values)
    sweep = Sweep.build(preset=args.preset, config=args.config, flags=flags)
    if args.preset is None and args.config is None and not args.methods:
        raise UserError("no method given: use --methods ep,acdc,eap (or --preset smoke|quick|paper)")
    summary = run_sweep(sweep, results=args.results, device=args.device, dtype=args.dtype, jobs=args.jobs,
                        backend=args.backend, cluster=args.cluster, dry_run=args.dry_run, progress=args.progress)
    return 1 if summary.failed_jobs else 0
