"""Layered circuit drawings (paper appendix F and figure 4).

Layers run bottom (``input``) to top (``logits``); each layer has a row of attention heads and,
above it, a row for its MLP. Only nodes the circuit touches are drawn (a writer with a kept
outgoing edge, a reader with a kept incoming edge), so a 99%-sparse GPT-2 circuit stays legible;
a layer's row is left out when nothing in it is touched, and every row is labelled. An edge
enters a head at the left of its box for the query, the middle for the key and the right for the
value, and q/k/v edges differ in colour and line style (q solid blue, k dashed green, v dash-dot
red); edges into an MLP are grey, into the logits black. Under grouped-query attention the key and
value inputs belong to a key/value group, drawn as a small node ``g<i>`` under its heads.

`draw_circuit(circuit)` draws one circuit; `draw_circuits([...])` several side by side on one
layout (so a found circuit and the ground truth line up), optionally marking the edges a circuit
has beyond a reference (orange halo) and those it misses (faint grey).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from . import style  # noqa: F401  (sets the headless backend before pyplot)
from .artifact import Artifact
from .data import ReportData, method_sort_key, task_sort_key

EDGE_STYLE = {
    "q": {"color": "#1f63b4", "linestyle": "-"},
    "k": {"color": "#2a9d3a", "linestyle": "--"},
    "v": {"color": "#c8312b", "linestyle": "-."},
    "mlp": {"color": "#a0661c", "linestyle": "-"},
    "logits": {"color": "0.05", "linestyle": "-"},
}
PORT_OFFSET = {"q": -0.22, "k": 0.0, "v": 0.22}
NODE_COLOURS = {"head": "#dbe8f6", "mlp": "#fbe3c8", "group": "#e5f2e5", "io": "#e6e6e6"}
EXTRA_HALO = "#ff9f1c"
MISSING_COLOUR = "0.75"

_READER = re.compile(r"^a(\d+)\.([hg])(\d+)<([qkv])>$")


@dataclass(frozen=True)
class Edge:
    writer: str  # node name
    reader: str  # node name (head, group, m<l> or logits)
    kind: str    # q, k, v, mlp, logits


def circuit_edges(circuit) -> list[Edge]:
    """The circuit's kept edges as (writer node, reader node, input kind)."""
    g = circuit.graph
    out = []
    for i, j in circuit.edges.nonzero().tolist():
        out.append(_edge(g.writer_names[i], g.reader_names[j]))
    return out


def _edge(writer: str, reader: str) -> Edge:
    if reader == "logits":
        return Edge(writer, "logits", "logits")
    m = _READER.match(reader)
    if m:
        layer, hg, idx, kind = m.groups()
        return Edge(writer, f"a{layer}.{hg}{idx}", kind)
    return Edge(writer, reader, "mlp")


def _node_row(node: str) -> tuple[int, str]:
    """(sort key of the row, row label) of a node: input, then per layer attention and MLP, logits."""
    if node == "input":
        return (-1, "embeddings")
    if node == "logits":
        return (10**9, "output")
    if node.startswith("m"):
        layer = int(node[1:])
        return (2 * layer + 1, f"layer {layer} MLP")
    layer = int(node[1:].split(".")[0])
    return (2 * layer, f"layer {layer} attention")


def _node_order(node: str) -> tuple:
    """Order within a row: heads by index; a kv group sits with its first head."""
    if node.startswith("a"):
        hg = node.split(".")[1]
        return (int(hg[1:]), hg[0])
    return (0, "")


def layout(nodes: set[str], graph) -> tuple[dict[str, tuple[float, float]], list[tuple[float, str]]]:
    """Positions of ``nodes``: rows bottom to top, the touched heads of a row spaced evenly and
    centred; kv-group nodes sit just below the heads they serve. Returns (positions, row labels)."""
    rows: dict[int, tuple[str, list[str]]] = {}
    groups = []
    for n in nodes:
        if re.match(r"^a\d+\.g\d+$", n):
            groups.append(n)
            continue
        key, label = _node_row(n)
        rows.setdefault(key, (label, []))[1].append(n)
    # a group's row must exist even when none of its heads is touched
    for n in groups:
        key, label = _node_row(n)
        rows.setdefault(key, (label, []))
    pos, labels = {}, []
    for y, key in enumerate(sorted(rows)):
        label, members = rows[key]
        members.sort(key=_node_order)
        for i, n in enumerate(members):
            pos[n] = (i - (len(members) - 1) / 2, float(y))
        labels.append((float(y), label))
    per_group = graph.n_heads // graph.kv_heads
    for n in sorted(groups, key=_node_order):
        layer, g = (int(x) for x in re.findall(r"\d+", n))
        y = next(yy for yy, key in zip(range(len(rows)), sorted(rows)) if key == 2 * layer)
        heads = [pos[f"a{layer}.h{h}"][0] for h in range(g * per_group, (g + 1) * per_group)
                 if f"a{layer}.h{h}" in pos]
        x = sum(heads) / len(heads) if heads else 0.0
        taken = {p for m, p in pos.items() if m in groups}
        while (x, y - 0.42) in taken:
            x += 0.5
        pos[n] = (x, y - 0.42)
    return pos, labels


def _node_kind(node: str) -> str:
    if node in ("input", "logits"):
        return "io"
    if node.startswith("m"):
        return "mlp"
    return "group" if ".g" in node else "head"


def _draw_nodes(ax, pos, nodes, fontsize):
    for n in nodes:
        x, y = pos[n]
        kind = _node_kind(n)
        w, h = (0.78, 0.3) if kind != "group" else (0.5, 0.2)
        if kind == "io":
            w = 1.1
        ax.add_patch(_box(x, y, w, h, NODE_COLOURS[kind]))
        label = n.split(".")[1] if kind == "group" else n
        ax.text(x, y, label, ha="center", va="center", fontsize=fontsize if kind != "group" else fontsize - 1,
                zorder=4)


def _box(x, y, w, h, colour):
    from matplotlib.patches import FancyBboxPatch

    return FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                          facecolor=colour, edgecolor="0.3", linewidth=0.8, zorder=3)


def _draw_edge(ax, pos, e: Edge, width: float, alpha: float, colour=None, linestyle=None, zorder=2):
    from matplotlib.patches import FancyArrowPatch

    (x0, y0), (x1, y1) = pos[e.writer], pos[e.reader]
    x1 += PORT_OFFSET.get(e.kind, 0.0) if _node_kind(e.reader) == "head" else 0.0
    st = EDGE_STYLE[e.kind]
    # Long edges curve so they do not run through the nodes of the rows they cross; each input kind
    # bends its own way (MLP edges alternate with the distance) so parallel edges fan out.
    rows = abs(y1 - y0)
    if rows <= 1.05:
        rad = 0.0
    else:
        rad = {"q": -0.16, "k": 0.12, "v": 0.24, "logits": -0.24}.get(e.kind, 0.14 if round(rows) % 2 else -0.08)
    ax.add_patch(FancyArrowPatch((x0, y0 + 0.15), (x1, y1 - 0.15), arrowstyle="-|>", mutation_scale=7,
                                 connectionstyle=f"arc3,rad={rad}", color=colour or st["color"],
                                 linestyle=linestyle or st["linestyle"], linewidth=width, alpha=alpha,
                                 zorder=zorder, shrinkA=0, shrinkB=0))


def draw_circuits(circuits, titles=None, compare_to=None, panel_width=None, fontsize=7.5):
    """Draw circuits side by side on one shared layout and return the Figure.

    ``compare_to``: a reference circuit (e.g. the Tracr ground truth); each other panel then marks
    its edges missing from the reference with an orange halo and draws the reference's edges it
    lacks in faint grey.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    style.apply_theme()
    circuits = list(circuits)
    if not circuits:
        raise ValueError("draw_circuits needs at least one circuit")
    graph = circuits[0].graph
    edge_sets = [circuit_edges(c) for c in circuits]
    ref_edges = set(circuit_edges(compare_to)) if compare_to is not None else None
    nodes = set()
    for edges in edge_sets + ([list(ref_edges)] if ref_edges else []):
        for e in edges:
            nodes |= {e.writer, e.reader}
    pos, rows = layout(nodes, graph)
    xs = [p[0] for p in pos.values()] or [0.0]
    span_x = max(xs) - min(xs) + 1.6
    n_rows = max(len(rows), 1)
    width = panel_width or max(2.6, 0.92 * span_x + 0.6)
    # tall models (30 layers = 60 rows) get flatter rows so the page stays scrollable
    row_height = max(0.38, min(0.62, 18.0 / n_rows))
    height = max(2.4, row_height * n_rows + 1.3)
    label_width = 1.5  # inches for the row labels left of the first panel
    n_legend = 5 + (2 if compare_to is not None else 0)
    # wide enough for the legend (one row) and the panel titles
    width = max(width, (0.95 * n_legend + 0.4 - label_width) / len(circuits), 2.9)
    fig, axes = plt.subplots(1, len(circuits), figsize=(width * len(circuits) + label_width, height), squeeze=False)
    axes = axes[0]
    n_edges_max = max((len(e) for e in edge_sets), default=0)
    lw = 1.3 if n_edges_max < 60 else (0.9 if n_edges_max < 250 else 0.6)
    alpha = 0.9 if n_edges_max < 60 else (0.65 if n_edges_max < 250 else 0.45)
    for k, (ax, circuit, edges) in enumerate(zip(axes, circuits, edge_sets)):
        touched = set()
        for e in edges:
            touched |= {e.writer, e.reader}
        compare = ref_edges is not None and circuit is not compare_to
        if compare:
            for e in ref_edges - set(edges):
                _draw_edge(ax, pos, e, lw, 0.8, colour=MISSING_COLOUR, linestyle=":", zorder=1)
                touched |= {e.writer, e.reader}
            for e in set(edges) - ref_edges:
                _draw_edge(ax, pos, e, lw + 3.0, 0.45, colour=EXTRA_HALO, linestyle="-", zorder=1)
        for e in edges:
            _draw_edge(ax, pos, e, lw, alpha)
        _draw_nodes(ax, pos, touched, fontsize)
        if k == 0:  # row labels left of the first panel, outside its data range
            for y, label in rows:
                ax.text(-0.02, y, label, ha="right", va="center", fontsize=fontsize, color="0.3",
                        transform=ax.get_yaxis_transform())
        # one data unit (a head's slot) is ~0.92 in whatever the panel's width, so boxes keep their shape
        centre, half = (min(xs) + max(xs)) / 2, max((max(xs) - min(xs)) / 2 + 0.8, width / 0.92 / 2)
        ax.set_xlim(centre - half, centre + half)
        ax.set_ylim(-0.7, n_rows - 0.3)
        ax.axis("off")
        title = titles[k] if titles else circuit.meta.get("name", "circuit")
        ax.set_title(f"{title}\n{circuit.n_edges} edges, sparsity {circuit.sparsity:.2%}", fontsize=fontsize + 2)
    handles = [Line2D([], [], linewidth=1.5, **EDGE_STYLE[k]) for k in ("q", "k", "v", "mlp", "logits")]
    labels = ["→ query", "→ key", "→ value", "→ MLP", "→ logits"]
    if ref_edges is not None:
        handles += [Line2D([], [], color=EXTRA_HALO, linewidth=4, alpha=0.5),
                    Line2D([], [], color=MISSING_COLOUR, linestyle=":", linewidth=1.5)]
        labels += ["not in ground truth", "ground truth, missed"]
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False, fontsize=fontsize + 0.5)
    # margins in inches, set by hand: tight_layout would measure every node label (slow on big circuits)
    W, H = fig.get_size_inches()
    fig.subplots_adjust(left=label_width / W, right=1 - 0.1 / W, top=1 - 0.75 / H, bottom=0.55 / H,
                        wspace=0.25 / width)
    return fig


def draw_circuit(circuit, title: str | None = None, fontsize: float = 7.5):
    """One circuit's layered drawing (a matplotlib Figure)."""
    return draw_circuits([circuit], [title] if title else None, fontsize=fontsize)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", str(text)).strip("-")


def representative_runs(data: ReportData):
    """For each (task, model, method): the sparsest run of the lowest seed at the most common
    training-set size and preset (the circuit the paper's appendix would draw)."""
    runs = data.runs
    out = []
    for (task, model, method), g in runs.groupby(["task", "model", "method"]):
        n = g["n_train"].mode().iloc[0] if g["n_train"].notna().any() else None
        preset = g["method_preset"].mode().iloc[0]
        sel = g[(g["method_preset"] == preset) & ((g["n_train"] == n) if n is not None else True)]
        sel = sel[sel["seed"] == sel["seed"].min()]
        out.append(sel.sort_values(["target_sparsity", "run_id"]).iloc[-1])
    out.sort(key=lambda r: (task_sort_key(r["task"]), r["model"], method_sort_key(r["method"])))
    return out


def circuit_diagrams(data: ReportData):
    """One diagram per (task, model, method) of the store (see `representative_runs`), yielded one
    at a time so the caller can write and close each before the next is drawn."""
    if data.runs.empty:
        yield Artifact(name="diagrams", title="Circuit diagrams", section="diagrams",
                       reason="the store holds no runs")
        return
    for r in representative_runs(data):
        circuit = data.circuit(r["run_id"])
        title = f"{r['method']} · {r['task']} · {r['model']}"
        fig = draw_circuit(circuit, title)
        yield (Artifact(
            name=f"circuit_{_slug(r['task'])}_{_slug(r['model'])}_{_slug(r['method'])}_s{r['target_sparsity']:g}",
            title=title, section="diagrams", figure=fig, run_ids=[r["run_id"]],
            caption=f"Run {r['run_id']}: seed {r['seed']}, n_train {r['n_train']}, target sparsity "
                    f"{r['target_sparsity']:g} (realised {r['sparsity']:.4f}, {int(r['n_edges'])} edges)."))


def tracr_figures(data: ReportData) -> list[Artifact]:
    """Paper figure 4: for each Tracr task, the ground truth beside each method's best circuit
    (highest F1 against the ground truth; ties: exact match, then the sparser run)."""
    from ..circuit import Circuit
    from .tables import tracr_recovery_rows

    table, notes = tracr_recovery_rows(data)
    if table.empty:
        return [Artifact(name="tracr", title="Tracr: found circuits beside the ground truth", section="tracr",
                         reason="no runs of a task with a ground truth (tracr-xproportion, tracr-reverse) in the "
                                "store", notes=notes)]
    arts = []
    for (task, model), g in table.groupby(["task", "model"], sort=False):
        best = (g.sort_values(["F1", "exact match", "target sparsity"], ascending=False)
                .groupby("method", sort=False).head(1))
        best = sorted(best.to_dict("records"), key=lambda r: method_sort_key(r["method"]))
        found = [data.circuit(r["run_id"]) for r in best]
        from .tables import ground_truth_edges

        truth = Circuit.from_names(found[0].graph, ground_truth_edges(task), meta={"name": "ground truth"})
        titles = ["ground truth"] + [f"{r['method']} (P {r['precision']:.2f}, R {r['recall']:.2f})" for r in best]
        fig = draw_circuits([truth, *found], titles, compare_to=truth, fontsize=8)
        arts.append(Artifact(
            name=f"tracr_{_slug(task)}", title=f"{task}: found circuits beside the ground truth", section="tracr",
            figure=fig, run_ids=[r["run_id"] for r in best],
            caption="Left: the compiled program's ground-truth circuit. Then each method's run with the highest "
                    "F1 against it; orange halo = an edge not in the ground truth, faint grey = a ground-truth "
                    "edge the circuit misses. " + "; ".join(
                        f"{r['method']}: run {r['run_id']} (target sparsity {r['target sparsity']:g})" for r in best)))
    return arts
