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
