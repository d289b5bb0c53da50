"""Circuits: a set of edges of a `Graph`, with optional scores, and their file formats.

Native JSON (``format: "circuitbench"``)::

    {"format": "circuitbench", "version": 1, "graph": {"layers":.., "heads":.., "kv_heads":..},
     "n_edges": .., "sparsity": .., "edges": ["input->a0.h0<q>", ...],
     "scores": {"input->a0.h0<q>": 0.12, ...} (optional), "meta": {...}}

(the graph also holds ``"parallel": true`` for a model with parallel blocks, `Graph.parallel`; a
circuit loads only onto a graph of the same shape and block kind).

Also read and written: the EAP-IG / MIB graph JSON (``{"cfg":.., "nodes": {name: bool}, "edges":
{name: {"score": float, "in_graph": bool}}}``, same edge names as ours) and Edge Pruning's
``edges.json`` (a list of ``[writer, reader]`` pairs with readers ``a{l}.h{h}.q|k|v``, ``m{l}``,
``resid_post`` and writers ``tok_embeds``/``pos_embeds`` for the embeddings). Edge Pruning files
without embedding writers come from runs where the embeddings could not be pruned: importing one
keeps every ``input`` edge, as that run did.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from .errors import UserError
from .graph import Graph

FORMATS = ("circuitbench", "eap", "edge-pruning")
CIRCUIT_SHAPE = ("layers", "heads", "kv_heads", "parallel")  # what a circuit file keeps of `Graph.to_dict`
# How a ranking becomes a circuit of a given size: the top edges, or the top edges until that many are
# effective (on an input -> logits path), the default of comparisons.
CUTS = ("effective", "edges")


@dataclass
class Circuit:
    graph: Graph
    edges: torch.Tensor  # bool [W, R], subset of graph.valid
    scores: torch.Tensor | None = None  # float [W, R] (NaN outside graph.valid) or None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        g = self.graph
        if tuple(self.edges.shape) != (g.n_writers, g.n_readers):
            raise ValueError(f"edge matrix must be {(g.n_writers, g.n_readers)}, got {tuple(self.edges.shape)}")
        self.edges = self.edges.bool().cpu() & g.valid

    # ---- constructors ----------------------------------------------------------------------------
    @classmethod
    def full(cls, graph: Graph) -> "Circuit":
        return cls(graph, graph.valid.clone(), meta={"name": "full"})

    @classmethod
    def empty(cls, graph: Graph) -> "Circuit":
        return cls(graph, torch.zeros_like(graph.valid), meta={"name": "empty"})

    @classmethod
    def from_names(cls, graph: Graph, names, scores: dict | None = None, meta=None) -> "Circuit":
        edges = torch.zeros_like(graph.valid)
        for name in names:
            i, j = graph.parse_edge(name)
            edges[i, j] = True
        sc = None
        if scores:
            sc = torch.full(graph.valid.shape, float("nan"))
            for name, s in scores.items():
                i, j = graph.parse_edge(name)
                sc[i, j] = float(s)
        return cls(graph, edges, sc, dict(meta or {}))

    @classmethod
    def from_scores(cls, graph: Graph, scores: torch.Tensor, n_edges: int, meta=None) -> "Circuit":
        """Keep the ``n_edges`` valid edges of largest |score| (ties broken by edge order)."""
        if not 0 <= n_edges <= graph.n_edges:
            raise UserError(f"cannot keep {n_edges} edges of a graph with {graph.n_edges}")
        flat = scores.detach().float().cpu().abs().masked_fill(~graph.valid, -math.inf).flatten()
        flat = torch.nan_to_num(flat, nan=-math.inf)
        keep = torch.zeros(flat.numel(), dtype=torch.bool)
        if n_edges:
            # stable ordering: sort by -score, then by index, so equal scores cut reproducibly
            order = torch.argsort(-flat, stable=True)[:n_edges]
            keep[order] = True
        sc = scores.detach().float().cpu().masked_fill(~graph.valid, float("nan"))
        return cls(graph, keep.view_as(graph.valid), sc, dict(meta or {}))

    @classmethod
    def from_sparsity(cls, graph: Graph, scores: torch.Tensor, sparsity: float, meta=None,
                      cut: str = "edges") -> "Circuit":
        """The circuit of a ranking at ``sparsity``: ``cut="edges"`` keeps the top edges
        (`from_scores`), ``cut="effective"`` the top edges until that many are effective
        (`from_scores_effective`)."""
        n = edges_for_sparsity(graph, sparsity)
        if cut == "edges":
            return cls.from_scores(graph, scores, n, meta)
        if cut == "effective":
            return cls.from_scores_effective(graph, scores, n, meta)
        raise UserError(f"unknown cut {cut!r}; choose one of {', '.join(CUTS)}")

    @classmethod
    def from_scores_effective(cls, graph: Graph, scores: torch.Tensor, n_effective: int, meta=None) -> "Circuit":
        """The effective edges of the shortest prefix of the ranking (largest |score| first, ties by
        edge order) that holds at least ``n_effective`` effective edges (`Graph.effective_edges`).

        Edges that lie on no input -> logits path are dropped as the ranking is walked, so a score
        method is compared at the size of the circuit that acts. Adding an edge can complete several
        paths at once, so the circuit may hold a few more than ``n_effective``; it holds fewer only
        when the whole graph does.
        """
        if not 0 <= n_effective <= graph.n_edges:
            raise UserError(f"cannot keep {n_effective} edges of a graph with {graph.n_edges}")
        ranked = cls.from_scores(graph, scores, graph.n_edges)  # scores checked and cleaned once
        flat = ranked.scores.abs().masked_fill(~graph.valid, -math.inf).flatten()
        flat = torch.nan_to_num(flat, nan=-math.inf)
        order = torch.argsort(-flat, stable=True)[:graph.n_edges]

        def effective(n):
            keep = torch.zeros(flat.numel(), dtype=torch.bool)
            keep[order[:n]] = True
            return graph.effective_edges(keep.view_as(graph.valid))

        # the effective count only grows along the ranking: binary search the shortest prefix
        lo, hi = 0, graph.n_edges
        while lo < hi:
            mid = (lo + hi) // 2
            if int(effective(mid).sum()) >= n_effective:
                hi = mid
            else:
                lo = mid + 1
        meta = dict(meta or {})
        meta.update(cut="effective", ranked_prefix=lo)
        return cls(graph, effective(lo), ranked.scores, meta)

    # ---- properties ------------------------------------------------------------------------------
    @property
    def n_edges(self) -> int:
        return int(self.edges.sum())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n_edges / self.graph.n_edges

    @property
    def effective_mask(self) -> torch.Tensor:
        """Bool [W, R]: the kept edges on an input -> logits path of kept edges (`Graph.effective_edges`)."""
        return self.graph.effective_edges(self.edges)

    @property
    def n_effective(self) -> int:
        return int(self.effective_mask.sum())

    @property
    def effective_sparsity(self) -> float:
        """1 - effective edges / total edges: the sparsity of the circuit that acts."""
        return 1.0 - self.n_effective / self.graph.n_edges

    def effective(self) -> "Circuit":
        """This circuit without its dangling edges (the same function under interchange ablation)."""
        return Circuit(self.graph, self.effective_mask, self.scores, {**self.meta, "dropped_dangling": True})

    def edge_mask(self, dtype=torch.float32, device=None) -> torch.Tensor:
        return self.edges.to(dtype=dtype, device=device)

    @property
    def edge_names(self) -> list[str]:
        g = self.graph
        return [g.edge_name(i, j) for i, j in self.edges.nonzero().tolist()]

    @property
    def nodes(self) -> list[str]:
        """Writers with at least one kept outgoing edge."""
        g = self.graph
        return [g.writer_names[i] for i in self.edges.any(1).nonzero().flatten().tolist()]

    def __and__(self, other: "Circuit") -> "Circuit":
        self._check_same(other)
        return Circuit(self.graph, self.edges & other.edges, meta={"name": "intersection"})

    def __or__(self, other: "Circuit") -> "Circuit":
        self._check_same(other)
        return Circuit(self.graph, self.edges | other.edges, meta={"name": "union"})

    def _check_same(self, other):
        if self.graph != other.graph:
            raise UserError("circuits are on different graphs")

    def summary(self) -> dict:
        return {"edges": self.n_edges, "effective_edges": self.n_effective, "total_edges": self.graph.n_edges,
                "sparsity": self.sparsity, "nodes": len(self.nodes)}

    # ---- native JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        g = self.graph
        shape = {k: v for k, v in g.to_dict().items() if k in CIRCUIT_SHAPE}
        d = {"format": "circuitbench", "version": 1, "graph": shape,
             "n_edges": self.n_edges, "n_effective": self.n_effective, "sparsity": self.sparsity,
             "edges": self.edge_names,
             "meta": self.meta}
        if self.scores is not None:
            d["scores"] = {g.edge_name(i, j): float(self.scores[i, j])
                           for i, j in g.edge_index.tolist() if not math.isnan(float(self.scores[i, j]))}
        return d

    def save(self, path, format: str = "circuitbench") -> None:
        """Write the circuit; ``format`` is one of circuitbench, eap, edge-pruning."""
        if format == "circuitbench":
            data = self.to_dict()
        elif format == "eap":
            data = self.to_eap()
        elif format == "edge-pruning":
            data = self.to_edge_pruning()
        else:
            raise UserError(f"unknown circuit format {format!r}; choose one of {', '.join(FORMATS)}")
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)  # a crash mid-write never leaves a truncated circuit

    @classmethod
    def load(cls, path, graph: Graph) -> "Circuit":
        """Read any supported format (detected from the content). Bad files raise `UserError`."""
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise UserError(f"circuit file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"circuit file {path} is not valid JSON ({err})") from None
        try:
            return cls.from_data(data, graph)
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"circuit file {path}: {err}") from None

    @classmethod
    def from_data(cls, data, graph: Graph) -> "Circuit":
        if isinstance(data, list):
            return cls.from_edge_pruning(data, graph)
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object or list")
        if data.get("format") == "circuitbench":
            gd = data.get("graph", {})
            want = {k: graph.to_dict().get(k, False) for k in CIRCUIT_SHAPE}
            if {k: gd.get(k, False if k == "parallel" else None) for k in want} != want:
                raise ValueError(f"circuit is for a graph {gd}, the model's graph is {want}")
            return cls.from_names(graph, data["edges"], data.get("scores"), data.get("meta"))
        if "edges" in data and isinstance(data["edges"], dict):
            return cls.from_eap(data, graph)
        raise ValueError("unrecognised circuit format (expected circuitbench, EAP-IG/MIB or Edge Pruning JSON)")

    # ---- EAP-IG / MIB graph JSON -----------------------------------------------------------------
    def to_eap(self) -> dict:
        g = self.graph
        nodes = {n: False for n in g.writer_names}
        nodes["logits"] = False
        edges = {}
        for i, j in g.edge_index.tolist():
            name = g.edge_name(i, j)
            keep = bool(self.edges[i, j])
            score = None if self.scores is None else float(self.scores[i, j])
            edges[name] = {"score": score, "in_graph": keep}
            if keep:
                nodes[g.writer_names[i]] = True
                reader = g.reader_names[j].split("<")[0]
                if reader in nodes:
                    nodes[reader] = True
        return {"cfg": {"n_layers": g.n_layers, "n_heads": g.n_heads, "n_key_value_heads": g.kv_heads,
                        "parallel_attn_mlp": g.parallel},
                "nodes": nodes, "edges": edges}

    @classmethod
    def from_eap(cls, data: dict, graph: Graph) -> "Circuit":
        cfg = data.get("cfg", {})
        if cfg and (cfg.get("n_layers"), cfg.get("n_heads")) != (graph.n_layers, graph.n_heads):
            raise ValueError(f"EAP graph has {cfg.get('n_layers')} layers x {cfg.get('n_heads')} heads; "
                             f"the model has {graph.n_layers} x {graph.n_heads}")
        if "parallel_attn_mlp" in cfg and bool(cfg["parallel_attn_mlp"]) != graph.parallel:
            raise ValueError(f"EAP graph has parallel_attn_mlp={cfg['parallel_attn_mlp']}; the model's blocks are "
                             f"{'parallel' if graph.parallel else 'sequential'}")
        names, scores = [], {}
        for name, e in data["edges"].items():
            if e.get("in_graph"):
                names.append(name)
            if e.get("score") is not None:
                scores[name] = e["score"]
        return cls.from_names(graph, names, scores or None, {"imported_from": "eap"})

    # ---- Edge Pruning edges.json -----------------------------------------------------------------
    def to_edge_pruning(self) -> list:
        out = []
        for name in self.edge_names:
            w, r = name.split("->")
            r = "resid_post" if r == "logits" else r.replace("<", ".").replace(">", "")
            for ww in (("tok_embeds", "pos_embeds") if w == "input" else (w,)):
                out.append([ww, r])
        return out

    @classmethod
    def from_edge_pruning(cls, data: list, graph: Graph) -> "Circuit":
        names, has_embed_nodes = set(), False
        for item in data:
            if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(s, str) for s in item)):
                raise ValueError(f"Edge Pruning edges must be [writer, reader] pairs, got {item!r}")
            w, r = item
            if w in ("tok_embeds", "pos_embeds"):
                w, has_embed_nodes = "input", True
            if r == "resid_post":
                r = "logits"
            elif r.count(".") == 2:
                a, h, kind = r.split(".")
                r = f"{a}.{h}<{kind}>"
            names.add(f"{w}->{r}")
        circuit = cls.from_names(graph, sorted(names), meta={"imported_from": "edge-pruning"})
        if not has_embed_nodes:  # embeddings were never prunable in that run
            circuit.edges[0] = graph.valid[0]
        return circuit


def edges_for_sparsity(graph: Graph, sparsity: float) -> int:
    """Edges kept at a requested sparsity (1 - kept/total), rounded to the nearest edge."""
    if not 0.0 <= sparsity <= 1.0:
        raise UserError(f"sparsity must lie in [0, 1], got {sparsity}")
    return int(round((1.0 - sparsity) * graph.n_edges))
