"""`circuitbench casestudy boolexpr`: the instruction-prompt vs few-shot case study (table 2).

    circuitbench casestudy boolexpr --model smollm2-135m --preset quick
    circuitbench casestudy boolexpr --model codellama/CodeLlama-13b-Instruct-hf --preset paper --dry-run

Finds the IP and FS circuits with Edge Pruning (stored like any `circuitbench run` job), evaluates
each in both settings, stores their intersection and prints table 2 with the overlap against
chance. Rerunning resumes. See `circuitbench.casestudy`.
"""
from __future__ import annotations


def add_parser(sub):
    from ..casestudy import PRESETS, STUDIES

    p = sub.add_parser("casestudy", help="instruction-prompt vs few-shot circuits on Boolean Expressions (table 2)",
                       description="Find the instruction-prompted (IP) and few-shot (FS) circuits of Boolean "
                                   "Expressions with Edge Pruning, evaluate each and their intersection in both "
                                   "settings, compare the overlap with chance, and store it all for `circuitbench "
                                   "report`. Resumable.")
    p.add_argument("study", choices=STUDIES, help="the case study (boolexpr)")
    p.add_argument("--model", default="smollm2-135m", help="model spec (default smollm2-135m)")
    p.add_argument("--preset", default="quick", choices=list(PRESETS),
                   help="paper (6,000 steps, whole splits), quick (300 steps, 200 examples) or smoke (seconds)")
    p.add_argument("--results", default="results", help="results folder (default results/)")
    p.add_argument("--steps", type=int, help="Edge Pruning steps (default: the preset's)")
    p.add_argument("--n-train", dest="n_train", type=int, help="training examples per setting (default: the preset's)")
    p.add_argument("--limit", type=int, help="evaluate on the first N test examples (default: the preset's)")
    p.add_argument("--device", help="cpu (default), cuda, cuda:1 or auto")
    p.add_argument("--dtype", help="float32 / bfloat16 / float16 (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--checkpoint", dest="checkpoint", action="store_true", default=None,
                   help="gradient checkpointing of the masked pass (default on CUDA)")
    p.add_argument("--no-checkpoint", dest="checkpoint", action="store_false")
    p.add_argument("--seed", type=int, default=0, help="Edge Pruning seed (default 0)")
    p.add_argument("--data-seed", dest="data_seed", type=int, default=0, help="seed of the task data (default 0)")
    p.add_argument("--eval-batch-size", dest="eval_batch_size", type=int, default=32)
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan, the time estimate and the memory per device; run nothing")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..casestudy import case_study_table_text, run_casestudy

    summary = run_casestudy(args.model, preset=args.preset, results=args.results, steps=args.steps,
                            n_train=args.n_train, limit=args.limit, device=args.device, dtype=args.dtype,
                            checkpoint=args.checkpoint, seed=args.seed, data_seed=args.data_seed,
                            eval_batch_size=args.eval_batch_size, dry_run=args.dry_run, progress=args.progress)
    if args.dry_run:
        return 0
    ratio = summary["overlap"] / summary["chance_overlap"] if summary["chance_overlap"] else float("nan")
    print(f"IP {summary['ip_edges']:,} edges, FS {summary['fs_edges']:,} edges of {summary['total_edges']:,}; "
          f"overlap {summary['overlap']:,} vs {summary['chance_overlap']:.3g} by chance ({ratio:.3g}x)")
    print(case_study_table_text(args.results))
    return 0
