"""One figure or table of the report, and how it is written to disk.

Figures go out as PNG and PDF; tables as Markdown, CSV (full precision, what a script should read)
and LaTeX. An artifact without data keeps the reason, which the HTML page shows in its place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

PNG_DPI = 150


@dataclass
class Artifact:
    """A figure (``figure``: a matplotlib Figure) or a table (``table``: a DataFrame) of the report.

    ``name`` is the file stem; ``kind`` "figure" or "table"; ``section`` the page section it belongs to; ``caption`` says what it
    shows; ``reason`` (instead of data) why there is nothing to show; ``run_ids`` the runs it was
    built from; ``files`` the paths written by `save`.
    """

    name: str
    title: str
    section: str
    kind: str = "figure"  # "figure" or "table"
    caption: str = ""
    figure: object | None = None
    table: pd.DataFrame | None = None
    reason: str | None = None
    run_ids: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def has_data(self) -> bool:
        return self.figure is not None or self.table is not None

    def save(self, out_dir: Path) -> list[Path]:
        """Write the artifact under ``out_dir`` (figures/ or tables/); returns the files written."""
        out_dir = Path(out_dir)
        if self.figure is not None:
            folder = out_dir / "figures"
            folder.mkdir(parents=True, exist_ok=True)
            for ext in ("png", "pdf"):
                path = folder / f"{self.name}.{ext}"
                self.figure.savefig(path, dpi=PNG_DPI if ext == "png" else None)
                self.files.append(path)
        elif self.table is not None:
            folder = out_dir / "tables"
            folder.mkdir(parents=True, exist_ok=True)
            stem = folder / self.name
            self.table.to_csv(f"{stem}.csv", index=False)
            Path(f"{stem}.md").write_text(f"**{self.title}**\n\n{to_markdown(self.table)}\n\n{self.caption}\n")
            Path(f"{stem}.tex").write_text(to_latex(self.table, self.title, self.caption))
            self.files += [Path(f"{stem}.md"), Path(f"{stem}.csv"), Path(f"{stem}.tex")]
        return self.files

    def close(self) -> None:
        if self.figure is not None:
            import matplotlib.pyplot as plt

            plt.close(self.figure)


def format_value(value) -> str:
    """A cell as text: integers as they are, other numbers to 4 significant digits, missing as —."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int,)) or (hasattr(value, "dtype") and getattr(value.dtype, "kind", "") in "iu"):
        return f"{int(value)}"
    if isinstance(value, float) or hasattr(value, "dtype"):
        v = float(value)
        if math.isnan(v):
            return "—"
        if v.is_integer() and abs(v) < 1e15:
            return f"{int(v)}"
        return f"{v:.4g}"
    text = str(value)
    return "—" if text in ("", "nan", "None") else text


def formatted(table: pd.DataFrame) -> pd.DataFrame:
    """The table with every cell as display text."""
    return table.apply(lambda col: col.map(format_value)) if len(table) else table.astype(str)


def to_markdown(table: pd.DataFrame) -> str:
    text = formatted(table)
    header = "| " + " | ".join(str(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    rows = ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in text.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "τ": r"$\tau$", "—": "--", "∩": r"$\cap$", "‖": r"$\|$", "≥": r"$\geq$", "×": r"$\times$"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def to_latex(table: pd.DataFrame, title: str, caption: str) -> str:
    """A booktabs tabular inside a table float, cells as in the Markdown version."""
    text = formatted(table)
    align = "".join("r" if pd.api.types.is_numeric_dtype(table[c]) else "l" for c in table.columns)
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{latex_escape(title)}. {latex_escape(caption)}}}",
             rf"\begin{{tabular}}{{{align}}}", r"\toprule",
             " & ".join(latex_escape(c) for c in table.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(v) for v in row) + r" \\" for row in text.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)
