"""Compare a results folder made by ``circuitbench run --preset smoke`` with the committed values.

    python tests/reference/compare_smoke.py RESULTS_DIR            # exit 1 and list differences
    python tests/reference/compare_smoke.py RESULTS_DIR --update   # rewrite tests/reference/smoke.json

Exact: the set of runs (method, task, model, n_train, seed, target sparsity), every circuit's edge
count and realised sparsity, and the set of metrics. Within a tolerance: metric values, |a - b| <= ABS_TOL + REL_TOL * |b| (float arithmetic
may differ in the last bits between CPUs and BLAS builds, and training amplifies that a little).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

REFERENCE = Path(__file__).with_name("smoke.json")
REL_TOL = 1e-3
ABS_TOL = 1e-5


def snapshot(results_dir) -> dict:
    """The comparable content of a results folder: circuits, metrics and reference metrics."""
    from circuitbench.store import ResultsStore

    store = ResultsStore(results_dir, readonly=True)
    runs = store.runs(with_metrics=True)
    out = {"runs": {}, "references": {}}
    for row in runs.to_dict(orient="records"):
        key = f"{row['method']}/{row['task']}/{row['model']}/n{row['n_train']}/seed{row['seed']}/s{row['target_sparsity']:g}"
        out["runs"][key] = {
            "job_id": row["job_id"], "n_edges": int(row["n_edges"]), "n_effective": int(row["n_effective"]),
            "total_edges": int(row["total_edges"]),
            "sparsity": float(row["sparsity"]),
            "metrics": {k[len("test/"):]: row[k] for k in row if k.startswith("test/") and not _nan(row[k])},
        }
    for row in store.reference_metrics().to_dict(orient="records"):
        key = f"{row['task']}/{row['model']}/{row['split']}/{row['circuit']}"
        out["references"].setdefault(key, {})[row["metric"]] = row["value"]
    store.close()
    return out


def _nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) <= ABS_TOL + REL_TOL * abs(b)


def compare(got: dict, want: dict) -> list[str]:
    """Differences between two snapshots, one line each (empty when they match)."""
    problems = []
    for section in ("runs", "references"):
        missing = sorted(set(want[section]) - set(got[section]))
        extra = sorted(set(got[section]) - set(want[section]))
        problems += [f"{section}: missing {k}" for k in missing] + [f"{section}: unexpected {k}" for k in extra]
    for key in sorted(set(got["runs"]) & set(want["runs"])):
        g, w = got["runs"][key], want["runs"][key]
        for field in ("n_edges", "total_edges"):
            if g[field] != w[field]:
                problems.append(f"{key}: {field} {g[field]} != reference {w[field]}")
        if not math.isclose(g["sparsity"], w["sparsity"], abs_tol=1e-12):
            problems.append(f"{key}: sparsity {g['sparsity']} != reference {w['sparsity']}")
        problems += _compare_metrics(key, g["metrics"], w["metrics"])
    for key in sorted(set(got["references"]) & set(want["references"])):
        problems += _compare_metrics(key, got["references"][key], want["references"][key])
    return problems


def _compare_metrics(key, got: dict, want: dict) -> list[str]:
    problems = []
    if set(got) != set(want):
        problems.append(f"{key}: metrics {sorted(got)} != reference {sorted(want)}")
    for m in sorted(set(got) & set(want)):
        if not _close(got[m], want[m]):
            problems.append(f"{key}: {m} = {got[m]!r}, reference {want[m]!r} (tolerance {ABS_TOL} + {REL_TOL} x |ref|)")
    return problems


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    update = "--update" in args
    args = [a for a in args if a != "--update"]
    if len(args) != 1:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    got = snapshot(args[0])
    if update:
        REFERENCE.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"wrote {REFERENCE} ({len(got['runs'])} runs, {len(got['references'])} reference sets)")
        return 0
    problems = compare(got, json.loads(REFERENCE.read_text()))
    for line in problems:
        print(line)
    print(f"smoke regression: {'OK' if not problems else f'{len(problems)} differences'} against {REFERENCE}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
