"""Ground-truth circuits of the compiled Tracr programs, derived from the compiled program itself.

Tracr gives every SOp its own residual subspace (basis directions labelled ``tokens:a``,
``indices:3``, ``is_x``, ``length:2``...). The compiler records, for every attention head and
MLP it allocates, the subspaces it reads (query, key and value separately for a head) and the
subspace it writes; the export keeps them (``NAME.json``, `circuitbench.tracr.compile`).

1. **Subspace edges** (`subspace_edges`). A component *reads* a direction when the compiler placed
   it in the component's input space **and** the compiled weights use it (a non-zero row of
   W_Q / W_K / W_V / W_in); it *writes* a direction when it is in its output space and W_O / W_out
   has a non-zero column there. (The compiler's spaces can be wider than what the weights use:
   ``tokens:BOS`` sits in the value space of xproportion's aggregate with an all-zero row.) The
   ``input`` node writes the token, index and constant ``one`` directions its embeddings set;
   ``logits`` reads the program's output directions. An edge writer -> reader carries
   information when the writer writes a direction the reader reads (the writer coming first in
   the forward pass), and lies on a path to ``logits``. Components the compiler left empty have no
   directions and no edges.
2. **Inert edges** (`inert_edges`). Some subspace edges feed compiler machinery that cannot change
   the program's output: in reverse, the query and key of the selector-width head (its selector
   is all-true, so every key gets the same score and the pattern is uniform whatever they read)
   and the constant ``one`` in the final head's query (the attend-to-BOS fallback, which only
   acts when no key matches; one always does). An edge is inert when removing it alone, under
   zero ablation, moves no scored output (every non-BOS position) of any input of the domain by
   more than ``INERT_TOL``; the remaining edges together are checked to reproduce the model within
   the same tolerance. Behaviourally such edges are indistinguishable from the edges outside the
   circuit (which carry exactly nothing), so no discovery method could recover them; the ground
   truth leaves them out. The result equals the ACDC paper's published Tracr circuits (Conmy et
   al. 2023) mapped to this graph.

``ground_truth(name)`` is (1) minus (2); ``ground_truth(name, include_inert=True)`` is (1). Never
derived from a discovery method's output.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..graph import Graph
from .exported import load_arrays, load_metadata
from .programs import get_program

# An edge is inert when removing it moves no scored output by more than this: far above Tracr's
# own softmax leakage (an attention head puts ~5e-7 of its weight on BOS) and far below any real
# effect in these programs (every other edge moves some output by > 0.7).
INERT_TOL = 1e-4


def _support(matrix: np.ndarray, axis: int) -> set[int]:
    """Residual dimensions a weight matrix touches: rows (axis=1 summed) or columns (axis=0)."""
    return set(np.flatnonzero(np.abs(matrix).sum(axis=axis) > 0).tolist())


def component_spaces(name: str) -> dict[str, dict[str, list[str]]]:
    """The directions each node reads and writes, keyed by graph node name.

    ``{"input": {"writes": [...]}, "a1.h0": {"reads_q", "reads_k", "reads_v", "writes"},
    "m0": {"reads", "writes"}, "logits": {"reads": [...]}}``; only allocated, non-empty components.
    Raises ValueError when the weights use a direction outside the compiler's declared space
    (an inconsistent export).
    """
    meta, w = load_metadata(name), load_arrays(name)
    labels = meta["residual_labels"]
    index = {label: i for i, label in enumerate(labels)}

    def used(declared: list[str], support: set[int], what: str) -> list[str]:
        declared_idx = {index[d] for d in declared}
        stray = support - declared_idx
        if stray:
            raise ValueError(f"tracr:{name} {what} uses {sorted(labels[i] for i in stray)} outside the "
                             f"compiler's declared space")
        return [labels[i] for i in sorted(declared_idx & support)]

    embed_support = _support(w["token_embed"], 0) | _support(w["pos_embed"], 0)
    spaces: dict[str, dict[str, list[str]]] = {
        "input": {"writes": used(meta["input_writes"], embed_support, "the embedding")},
    }
    allocated = set()
    for comp in meta["components"]:
        l, cname = comp["layer"], comp["name"]
        allocated.add(cname)
        if comp["kind"] == "attention":
            h = comp["head"]
            entry = {
                "reads_q": used(comp["reads_q"], _support(w["W_Q"][l, h], 1), f"{cname} W_Q"),
                "reads_k": used(comp["reads_k"], _support(w["W_K"][l, h], 1), f"{cname} W_K"),
                "reads_v": used(comp["reads_v"], _support(w["W_V"][l, h], 1), f"{cname} W_V"),
                "writes": used(comp["writes"], _support(w["W_O"][l, h], 0), f"{cname} W_O"),
            }
        else:
            entry = {
                "reads": used(comp["reads"], _support(w["W_in"][l], 1), f"{cname} W_in"),
                "writes": used(comp["writes"], _support(w["W_out"][l], 0), f"{cname} W_out"),
            }
        if any(entry.values()):
            spaces[cname] = entry
    # slots the compiler did not allocate must be all zero, or the ground truth would miss them
    for l in range(meta["n_layers"]):
        for h in range(meta["n_heads"]):
            if f"a{l}.h{h}" not in allocated and any(np.any(w[k][l, h]) for k in ("W_Q", "W_K", "W_V", "W_O")):
                raise ValueError(f"tracr:{name} head a{l}.h{h} has weights but no compiler allocation")
        if f"m{l}" not in allocated and any(np.any(w[k][l]) for k in ("W_in", "b_in", "W_out", "b_out")):
            raise ValueError(f"tracr:{name} MLP m{l} has weights but no compiler allocation")
    spaces["logits"] = {"reads": used(meta["logits_reads"], _support(w["unembed"], 1), "the unembedding")}
    return spaces


def _reads(spaces, reader: str) -> set[str]:
    """Directions a graph reader reads: ``a1.h0<q>`` -> the head's query directions, etc."""
    if reader.endswith(">"):
        node, kind = reader[:-3], reader[-2]
        return set(spaces.get(node, {}).get(f"reads_{kind}", ()))
    return set(spaces.get(reader, {}).get("reads", ()))


def subspace_edges(name: str) -> dict[str, list[str]]:
    """Every edge whose writer writes a direction its reader reads, on a path to the logits,
    mapped to the directions it carries (graph edge order, writer-major)."""
    meta = load_metadata(name)
    spaces = component_spaces(name)
    graph = Graph(meta["n_layers"], meta["n_heads"])
    carrying = {}
    for wi, ri in graph.edge_index.tolist():
        writer, reader = graph.writer_names[wi], graph.reader_names[ri]
        shared = set(spaces.get(writer, {}).get("writes", ())) & _reads(spaces, reader)
        if shared:
            carrying[(writer, reader)] = shared

    # keep edges on a path to the logits: walk the readers backwards from the output
    live = {"logits"}
    for writer, reader in sorted(carrying, key=lambda e: -graph.reader_index[e[1]]):
        if reader.split("<")[0] in live:
            live.add(writer)
    order = {label: i for i, label in enumerate(meta["residual_labels"])}
    return {f"{w}->{r}": sorted(dirs, key=order.get)
            for (w, r), dirs in carrying.items() if r.split("<")[0] in live}


# ---- the functional check: which subspace edges change the output at all ---------------------------
def zero_ablation_forward(adapter, ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          edge_mask: torch.Tensor) -> torch.Tensor:
    """The adapter's outputs ``[B, S, n_out]`` when reader r reads ``sum_w edge_mask[w, r] * y_w``.

    Zero ablation written out directly from the `Adapter` methods, independent of the engine, so
    the ground truth does not rest on the code it is used to test.
    """
    graph = adapter.graph
    ctx = adapter.context(ids.shape[1], attention_mask, ids.device)
    emb = adapter.embed(ids)
    shape = emb.shape
    stack = emb.new_empty(graph.n_writers, emb.numel())  # writer outputs, in writer order
    stack[0] = emb.reshape(-1)
    n = 1

    def read(readers):
        mask = edge_mask[:n, readers].to(stack.dtype)  # [W, R]
        return (mask.T @ stack[:n]).view(-1, *shape)

    for l in range(graph.n_layers):
        if adapter.attn_out_bias(l) is not None:
            raise ValueError("zero_ablation_forward assumes no attention output bias (Tracr has none)")
        heads = adapter.attention(l, read(graph.attn_readers(l)), ctx, per_head=True)
        stack[n:n + len(heads)] = heads.reshape(len(heads), -1)
        n += len(heads)
        stack[n] = adapter.mlp(l, read([graph.mlp_reader(l)])[0]).reshape(-1)
        n += 1
    return adapter.unembed(read([graph.logits_reader])[0])


@lru_cache(maxsize=None)
def _functional(name: str, tol: float) -> tuple[tuple[str, ...], float]:
    """Subspace edges whose single removal changes a scored output by more than ``tol`` on some
    input of the domain, and the largest change the remaining circuit makes (checked <= tol)."""
    from .adapter import load_tracr  # the adapter imports this module's package

    adapter, tokenizer = load_tracr(name, dtype=torch.float64)
    spec = get_program(name)
    seqs = [tokenizer.encode(seq, add_bos=True) for seq in spec.domain()]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), tokenizer.pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(ids)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
    scored = attention_mask.bool()
    scored[:, 0] = False  # the BOS position carries no program output

    graph = adapter.graph
    edges = list(subspace_edges(name))
    mask = torch.zeros(graph.n_writers, graph.n_readers, dtype=torch.float64)
    for edge in edges:
        mask[graph.parse_edge(edge)] = 1
    full = zero_ablation_forward(adapter, ids, attention_mask, graph.full_mask(torch.float64))

    def change(edge_mask):
        return float((zero_ablation_forward(adapter, ids, attention_mask, edge_mask) - full)[scored].abs().max())

    kept = []
    for edge in edges:
        without = mask.clone()
        without[graph.parse_edge(edge)] = 0
        if change(without) > tol:
            kept.append(edge)
    circuit = torch.zeros_like(mask)
    for edge in kept:
        circuit[graph.parse_edge(edge)] = 1
    residual = change(circuit)
    if residual > tol:
        raise ValueError(f"tracr:{name}: the edges that matter one by one change the output by {residual:.2e} "
                         f"together; the inert edges are not jointly inert")
    return tuple(kept), residual


def inert_edges(name: str, tol: float = INERT_TOL) -> list[str]:
    """Subspace edges of ``name`` whose removal (zero ablation) changes no scored output of any input
    in the domain by more than ``tol`` (see the module docstring)."""
    kept = set(_functional(name, tol)[0])
    return [edge for edge in subspace_edges(name) if edge not in kept]


def ground_truth_directions(name: str, include_inert: bool = False) -> dict[str, list[str]]:
    """Ground-truth edges of program ``name`` -> the residual directions each carries.

    Edges are in the graph's edge order (writer-major), named like ``m0->a1.h0<v>``.
    ``include_inert=True`` keeps the subspace edges that change no output (see `inert_edges`).
    """
    edges = subspace_edges(name)
    if include_inert:
        return edges
    kept = set(_functional(name, INERT_TOL)[0])
    return {edge: dirs for edge, dirs in edges.items() if edge in kept}


def ground_truth(name: str, include_inert: bool = False) -> list[str]:
    """Ground-truth edge names of program ``name`` (see the module docstring for the derivation)."""
    return list(ground_truth_directions(name, include_inert))
