"""`circuitbench results`: the stored runs as a table.

    circuitbench results [--results DIR] [--method M] [--task T] [--model SPEC] [--csv FILE] [--json] [--all]

One row per run (a circuit of a job): its configuration, realised sparsity, edge count and
effective edge count (edges on an input -> logits path of kept edges), wall
time and every metric. ``--csv FILE`` writes the full table; ``--json`` prints one JSON list of
rows; ``--all`` also lists failed jobs with their error.

Below the runs, one row per series (method, preset, training-set size of a task and model, its
runs averaged over seeds, as in the report) with MIB's CPR and CMD of the task's main metric and
which sizes they integrate (`circuitbench.report.curves.mib_areas`: "MIB grid", "measured: ..."
or "n/a: ..."); shown where the store holds the full-model and empty-circuit references. The CSV
and JSON rows carry their series' values as ``cpr``, ``cmd`` and ``cpr_cmd_points``.
"""
from __future__ import annotations

import json
import math
import sys

from ..errors import UserError

# The columns shown on screen (the CSV and JSON outputs hold every column).
SCREEN_COLUMNS = ["job_id", "method", "task", "model", "n_train", "seed", "target_sparsity", "sparsity",
                  "n_edges", "n_effective", "wall_total_s", "eval_s"]


def add_parser(sub):
    p = sub.add_parser("results", help="print the stored runs as a table (CSV/JSON export)")
    p.add_argument("--results", default="results", help="results folder (default results/)")
    p.add_argument("--method", help="only these methods (comma list)")
    p.add_argument("--task", help="only these tasks (comma list)")
    p.add_argument("--model", help="only these models (comma list)")
    p.add_argument("--csv", help="write the whole table (every column) to this CSV file")
    p.add_argument("--json", action="store_true", help="print one JSON list of rows")
    p.add_argument("--all", action="store_true", help="also list failed jobs")
    p.set_defaults(func=run)


def _split(value):
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def load_table(results: str, method=None, task=None, model=None, include_failed: bool = False):
    """The runs with one column per test metric (``test/<metric>``)."""
    from ..store import ResultsStore

    store = ResultsStore(results, readonly=True)  # reading never migrates a store
    try:
        return store.runs(method=_split(method), task=_split(task), model=_split(model),
                          status=None if include_failed else "complete", with_metrics=True)
    finally:
        store.close()


def area_table(results: str, method=None, task=None, model=None):
    """One row per series with references to normalise against: MIB's CPR and CMD (and which sizes
    they integrate), with the series' run ids (column ``run_ids``)."""
    import pandas as pd

    from ..report.curves import normalised_panels
    from ..report.data import load_report_data

    data = load_report_data(results)
    try:
        rows = []
        for t, m, metric, normed in normalised_panels(data):
            for n in normed:
                c = n.curve
                rows.append({"task": t, "model": m, "method": c.method, "preset": c.method_preset,
                             "n_train": c.n_train, "metric": metric, "seeds": c.n_seeds, "sizes": len(c.points),
                             "cpr": n.cpr, "cmd": n.cmd, "cpr/cmd points": n.mib_grid, "run_ids": c.run_ids})
    finally:
        data.store.close()
    df = pd.DataFrame(rows)
    for col, value in (("method", method), ("task", task), ("model", model)):
        if value and len(df):
            df = df[df[col].isin(_split(value))]
    return df.reset_index(drop=True)


def _clean(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):
        return _clean(value.item())
    return value


def run(args) -> int:
    import pandas as pd

    df = load_table(args.results, args.method, args.task, args.model, include_failed=args.all)
    areas = area_table(args.results, args.method, args.task, args.model) if not df.empty else None
    if areas is not None and len(areas):
        of_run = {rid: r for r in areas.to_dict(orient="records") for rid in r["run_ids"]}
        for col, key in (("cpr", "cpr"), ("cmd", "cmd"), ("cpr_cmd_points", "cpr/cmd points")):
            df[col] = [of_run[rid][key] if rid in of_run else None for rid in df["run_id"]]
    if args.csv:
        try:
            df.to_csv(args.csv, index=False)
        except OSError as err:
            raise UserError(f"cannot write {args.csv}: {err.strerror}") from None
    if args.json:
        rows = []
        for rec in df.to_dict(orient="records"):
            row = {k: _clean(v) for k, v in rec.items()}
            for key in ("config", "method_config", "versions"):
                if isinstance(row.get(key), str):
                    row[key] = json.loads(row[key])
            rows.append(row)
        json.dump(rows, sys.stdout)
        print()
        return 0
    if df.empty:
        print(f"no runs stored in {args.results}" + (" for this filter" if args.method or args.task or args.model else ""))
        return 0
    metric_cols = [c for c in df.columns if c.startswith("test/")]
    cols = [c for c in SCREEN_COLUMNS if c in df.columns] + metric_cols
    if args.all and "status" in df.columns:
        cols = cols[:1] + ["status"] + cols[1:] + ["error"]
    table = df[cols].rename(columns={c: c[5:] for c in metric_cols})
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250,
                           "display.float_format", lambda v: f"{v:.4g}"):
        print(table.to_string(index=False))
        if areas is not None and len(areas):
            print("\nMIB's CPR (area under the normalised faithfulness curve, higher is better) and CMD (area "
                  "under |1 - faithfulness|, lower is better) per series, mean over seeds:")
            print(areas.drop(columns="run_ids").to_string(index=False))
    if args.csv:
        print(f"wrote {len(df)} rows to {args.csv}")
    return 0
