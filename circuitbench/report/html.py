"""``index.html``: every figure and table of the report on one page, with the runs they came from.

A figure or table without data shows why in its place ("No data: ..."), so nothing is silently
missing. Long tables show their first rows with a link to the full CSV. The page is plain HTML
and CSS (no scripts), linking the files written beside it.
"""
from __future__ import annotations

import html
import os
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from .artifact import Artifact, format_value

SECTIONS = (
    ("faithfulness", "Faithfulness (paper figure 2)"),
    ("performance", "Performance (paper figure 3)"),
    ("exact_match", "Exact match / Kendall's τ (paper figure 5)"),
    ("accuracy", "Accuracy / probability difference 10 (paper figure 6)"),
    ("auc", "Area under the faithfulness curve"),
    ("scaling", "Scaling with the training-set size (paper table 1)"),
    ("runtime", "Runtime"),
    ("training", "Training curves (Edge Pruning)"),
    ("tracr", "Tracr: recovering the ground truth (paper figure 4)"),
    ("case_study", "Case study: instruction-prompted vs few-shot (paper table 2)"),
    ("edge_faithfulness", "Edge faithfulness (paper appendix D, figure 7)"),
    ("diagrams", "Circuit diagrams (paper appendix F)"),
)
MAX_TABLE_ROWS = 60
RUN_COLUMNS = ["run_id", "method", "method_preset", "task", "model", "n_train", "seed", "target_sparsity",
               "sparsity", "n_edges", "wall_total_s", "device_name"]

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1320px;
       color: #1d1d1f; padding: 0 16px; line-height: 1.45; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 42px; }
h3 { margin-bottom: 6px; }
.meta { color: #555; font-size: 14px; }
nav a { margin-right: 14px; font-size: 14px; white-space: nowrap; }
figure { margin: 14px 0 26px; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, .caption { color: #444; font-size: 14px; max-width: 1100px; }
.links a { margin-right: 10px; font-size: 13px; }
.nodata { background: #fff6e5; border-left: 4px solid #f0a020; padding: 8px 12px; font-size: 14px; }
.notes { color: #7a4b00; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f4f4f6; position: sticky; top: 0; }
td.text { text-align: left; }
.scroll { overflow-x: auto; max-width: 100%; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(400px, 1fr)); gap: 18px; }
.grid figure { margin: 0; } .grid h3 { font-size: 15px; margin: 0 0 4px; }
.grid figure img { max-height: 640px; object-fit: contain; width: 100%; background: white; }
details { font-size: 13px; color: #444; margin: 4px 0 10px; } details code { font-size: 12px; }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _rel(path: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(path, out_dir)).as_posix()


def table_html(table: pd.DataFrame, max_rows: int | None = MAX_TABLE_ROWS, anchor_col: str | None = None) -> str:
    """A DataFrame as an HTML table with the report's number format."""
    rows = table if max_rows is None else table.head(max_rows)
    out = ['<div class="scroll"><table><thead><tr>']
    out += [f"<th>{_e(c)}</th>" for c in table.columns]
    out.append("</tr></thead><tbody>")
    numeric = {c: pd.api.types.is_numeric_dtype(table[c]) for c in table.columns}
    for rec in rows.itertuples(index=False):
        anchor = ""
        if anchor_col is not None:
            anchor = f' id="run-{_e(getattr(rec, anchor_col))}"'
        out.append(f"<tr{anchor}>")
        for c, v in zip(table.columns, rec):
            cls = "" if numeric[c] else ' class="text"'
            out.append(f"<td{cls}>{_e(format_value(v))}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _runs_details(run_ids: list[str]) -> str:
    ids = list(dict.fromkeys(run_ids))
    if not ids:
        return ""
    links = ", ".join(f'<a href="#run-{_e(r)}"><code>{_e(r)}</code></a>' for r in ids)
    return f"<details><summary>from {len(ids)} run{'s' if len(ids) != 1 else ''}</summary>{links}</details>"


def artifact_html(art: Artifact, out_dir: Path, thumbnail: bool = False) -> str:
    """One figure or table with its caption, file links, notes and source runs; ``thumbnail``: the
    image links to its full-size file (the diagrams grid)."""
    parts = [f'<h3 id="{_e(art.kind)}-{_e(art.name)}">{_e(art.title)}</h3>']
    if not art.has_data:
        parts.append(f'<p class="nodata"><b>No data.</b> {_e(art.reason or "nothing to show")}</p>')
        if art.caption:
            parts.append(f'<p class="caption">What it would show: {_e(art.caption)}</p>')
    elif art.figure is not None:
        png = next((f for f in art.files if f.suffix == ".png"), None)
        links = " ".join(f'<a href="{_e(_rel(f, out_dir))}">{f.suffix[1:].upper()}</a>' for f in art.files)
        img = f'<img src="{_e(_rel(png, out_dir))}" alt="{_e(art.title)}" loading="lazy">' if png else ""
        if thumbnail and png:
            img = f'<a href="{_e(_rel(png, out_dir))}">{img}</a>'
        parts.append(f'<figure>{img}<figcaption>{_e(art.caption)} <span class="links">{links}</span>'
                     f'</figcaption></figure>')
    else:
        links = " ".join(f'<a href="{_e(_rel(f, out_dir))}">{ {".md": "Markdown", ".csv": "CSV", ".tex": "LaTeX"}[f.suffix]}</a>'
                         for f in art.files)
        parts.append(f'<p class="caption">{_e(art.caption)} <span class="links">{links}</span></p>')
        parts.append(table_html(art.table))
        if len(art.table) > MAX_TABLE_ROWS:
            parts.append(f'<p class="caption">First {MAX_TABLE_ROWS} of {len(art.table)} rows; the CSV has them all.</p>')
    if art.notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{_e(n)}</li>" for n in art.notes) + "</ul>")
    parts.append(_runs_details(art.run_ids))
    return "\n".join(parts)


def _overview(data, counts: dict) -> str:
    runs = data.runs
    lines = [f"<p class=\"meta\">Results store <code>{_e(data.root.resolve())}</code>: "
             f"{counts.get('complete', 0)} complete jobs, {counts.get('failed', 0)} failed, "
             f"{counts.get('runs', 0)} evaluated circuits, {counts.get('references', 0)} reference sets. "
             f"Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')} from the store alone "
             f"(no method was rerun).</p>"]
    if not runs.empty:
        def joined(col):
            return ", ".join(sorted({str(v) for v in runs[col].dropna()}))

        versions = ", ".join(sorted({f"circuitbench {v}" for v in runs["circuitbench_version"].dropna()}
                                    | {f"torch {v}" for v in runs["torch_version"].dropna()}))
        lines.append(f"<p class=\"meta\"><b>Methods</b> {_e(joined('method'))} · <b>Tasks</b> {_e(joined('task'))} · "
                     f"<b>Models</b> {_e(joined('model'))} · <b>Training sizes</b> "
                     f"{_e(', '.join(str(int(n)) for n in sorted(runs['n_train'].dropna().unique())))} · "
                     f"<b>Seeds</b> {_e(', '.join(str(int(s)) for s in sorted(runs['seed'].dropna().unique())))}"
                     f"<br><b>Devices</b> {_e(joined('device_name'))} · <b>Versions</b> {_e(versions)}</p>")
    return "\n".join(lines)


def runs_section(data, out_dir: Path) -> str:
    runs = pd.concat([data.runs, data.derived], ignore_index=True) if not data.derived.empty else data.runs
    if runs.empty:
        return '<p class="nodata"><b>No data.</b> the store holds no runs</p>'
    metric_cols = sorted(c for c in runs.columns if "/" in c and runs[c].notna().any())
    table = runs[[c for c in RUN_COLUMNS if c in runs.columns] + metric_cols].copy()
    table["circuit"] = [_rel(data.root / f, out_dir) for f in runs["circuit_file"]]
    parts = [f'<p class="caption">Every evaluated circuit ({len(table)}): its job\'s configuration, realised '
             f'sparsity and edges, the discovery\'s wall time, and every stored metric (split/metric; '
             f'<code>test@TASK</code> = evaluated in another task\'s setting). Circuit files are native '
             f'circuitbench JSON.</p>']
    # run ids are anchors the figures link to; the table is shown whole
    body = table_html(table.drop(columns=["circuit"]), max_rows=None, anchor_col="run_id")
    parts.append(body)
    return "\n".join(parts)


def failed_section(data) -> str:
    failed = data.failed
    if failed is None or failed.empty:
        return '<p class="caption">No failed jobs.</p>'
    cols = [c for c in ("job_id", "method", "task", "model", "n_train", "seed", "target_sparsity", "error")
            if c in failed.columns]
    return ('<p class="caption">Jobs that raised; `circuitbench run` retries them on the next run.</p>'
            + table_html(failed[cols], max_rows=None))


def write_index(out_dir: Path, data, artifacts: list[Artifact], counts: dict) -> Path:
    """Write ``out_dir/index.html`` for ``artifacts`` (already saved) and return its path."""
    out_dir = Path(out_dir)
    by_section: dict[str, list[Artifact]] = {}
    for art in artifacts:
        by_section.setdefault(art.section, []).append(art)
    nav = " ".join(f'<a href="#{key}">{_e(title.split(" (")[0])}</a>' for key, title in SECTIONS)
    nav += ' <a href="#runs">Runs</a> <a href="#failed">Failed jobs</a>'
    body = ["<h1>circuitbench report</h1>", _overview(data, counts), f"<nav>{nav}</nav>"]
    for key, title in SECTIONS:
        body.append(f'<h2 id="{key}">{_e(title)}</h2>')
        arts = by_section.get(key, [])
        if not arts:
            body.append('<p class="nodata"><b>No data.</b> nothing in the store for this section</p>')
        if key == "diagrams" and any(a.has_data for a in arts):
            body.append('<p class="caption">One circuit per task, model and method (its sparsest run); click a '
                        'drawing for the full-size image. Layers run bottom to top; q/k/v inputs enter a head '
                        'at the left/middle/right in blue/green/red.</p>')
            body.append('<div class="grid">' + "".join(f"<div>{artifact_html(a, out_dir, thumbnail=True)}</div>"
                                                        for a in arts) + "</div>")
            continue
        # figures first, then tables
        for art in sorted(arts, key=lambda a: a.kind != "figure"):
            body.append(artifact_html(art, out_dir))
    body.append('<h2 id="runs">Runs</h2>')
    body.append(runs_section(data, out_dir))
    body.append('<h2 id="failed">Failed jobs</h2>')
    body.append(failed_section(data))
    return _write(out_dir, "\n".join(body))


def write_empty_index(out_dir: Path, root: Path, counts: dict) -> Path:
    """The page for a store without runs: says so, and how to fill it."""
    failed = counts.get("failed", 0)
    extra = f" It records {failed} failed job{'s' if failed != 1 else ''}." if failed else ""
    body = (f"<h1>circuitbench report</h1><p class=\"nodata\"><b>No data.</b> The results store "
            f"<code>{_e(Path(root).resolve())}</code> holds no evaluated circuits yet.{_e(extra)} Run a sweep first, "
            f"e.g. <code>circuitbench run --preset quick --results {_e(root)}</code>, then "
            f"<code>circuitbench report --results {_e(root)}</code>.</p>")
    return _write(Path(out_dir), body)


def _write(out_dir: Path, body: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>circuitbench report</title><style>{CSS}</style></head><body>\n{body}\n</body></html>\n")
    path = out_dir / "index.html"
    tmp = out_dir / ".index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
