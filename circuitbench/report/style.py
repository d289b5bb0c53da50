"""Shared plotting style: headless backend, seaborn theme, one colour per method everywhere."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # the report runs headless (servers, CI); set before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

from .data import METHOD_ORDER, method_sort_key  # noqa: E402

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
FULL_STYLE = {"color": "0.35", "linestyle": "--", "linewidth": 1.2}
EMPTY_STYLE = {"color": "0.1", "linestyle": ":", "linewidth": 1.4}


def apply_theme() -> None:
    sns.set_theme(context="paper", style="whitegrid", font_scale=1.15)
    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 150, "axes.titlesize": 11})


def method_colours(methods) -> dict[str, tuple]:
    """A fixed colour per method: the known methods keep theirs whatever else the store holds."""
    palette = sns.color_palette("colorblind", 10)
    known = {m: palette[i] for i, m in enumerate(METHOD_ORDER)}
    extra = [m for m in sorted(set(methods), key=method_sort_key) if m not in known]
    colours = dict(known)
    for i, m in enumerate(extra):
        colours[m] = palette[(len(METHOD_ORDER) + i) % len(palette)] if i + len(METHOD_ORDER) < 10 \
            else sns.color_palette("husl", len(extra))[i]
    return colours


# the space left between the figure's title, the panels and the legend below them, in inches
LAYOUT_GAP = 0.1


def fit_panels(fig, legend=None, rect_top: float = 1.0) -> None:
    """Lay the panels out between the suptitle and ``legend`` (a figure legend at the bottom, or
    None), measured; use it instead of ``fig.tight_layout``.

    tight_layout sets the side margins and the space between panels; it already makes room for
    the suptitle (a ``rect_top`` below 1 made room twice: a blank band above the panel titles), but
    pads it on both sides although it hugs the figure's top edge. So the panels' top and bottom are
    then moved to sit ``LAYOUT_GAP`` below the suptitle and above the legend: only ever outwards,
    which makes the panels taller and never brings two rows closer together.
    """
    renderer = fig.canvas.get_renderer()
    height, gap = fig.bbox.height, LAYOUT_GAP * fig.dpi
    floor = legend.get_window_extent(renderer).y1 if legend is not None else 0.0
    fig.tight_layout(rect=(0, min((floor + gap) / height, 0.5), 1, rect_top))
    boxes = [ax.get_tightbbox(renderer) for ax in fig.axes if ax.get_visible()]
    if not boxes:
        return
    suptitle = getattr(fig, "_suptitle", None)
    ceiling = suptitle.get_window_extent(renderer).y0 if suptitle is not None and suptitle.get_text() \
        else rect_top * height
    up = max(ceiling - gap - max(b.y1 for b in boxes), 0.0)
    down = max(min(b.y0 for b in boxes) - (floor + gap), 0.0)
    params = fig.subplotpars
    fig.subplots_adjust(top=params.top + up / height, bottom=params.bottom - down / height)


def legend_columns(fig, labels, most: int = 7) -> int:
    """How many legend columns fit across ``fig``'s width for these labels (a long label needs
    about 0.085 inch per character plus its handle), at most ``most``."""
    per_col = max(1.0, max((0.35 + 0.085 * len(str(label)) for label in labels), default=1.0))
    return max(1, min(len(labels), most, int(fig.get_figwidth() / per_col)))
