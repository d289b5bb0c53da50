"""The edge graph of a transformer: writers, readers and the dense writer x reader edge matrix.

Writers (in forward order): ``input``, then per layer ``a{l}.h{h}`` for every head and ``m{l}``.
Readers (in forward order): per layer ``a{l}.h{h}<q>`` for every head, ``<k>`` and ``<v>`` per head
(or ``a{l}.g{g}<k>``/``<v>`` per key/value group under grouped-query attention), ``m{l}``; last
``logits``. Writer ``w`` feeds reader ``r`` when ``w`` is computed before ``r`` is read, so in a
sequential block (GPT-2, Llama) the MLP of layer ``l`` reads the heads of layer ``l``. This is the
EAP/ACDC/MIB convention: GPT-2 small has 32,491 edges.

Parallel blocks (``parallel=True``: GPT-NeoX/Pythia with ``use_parallel_residual``) compute
attention and MLP of layer ``l`` from the same residual, the stream before the layer, and add both
to it: the MLP of layer ``l`` reads exactly the writers its layer's attention reads, not the layer's
heads. Such a graph has ``layers x heads`` edges fewer than the sequential one of its shape (EAP-IG's
``parallel_attn_mlp``). The writer and reader orders and names are the same in both.

Read slots: a pass reads the residual stream at ``2L + 1`` points, in this order: slot ``2l`` for
layer ``l``'s attention readers, ``2l + 1`` for its MLP reader, ``2L`` for the logits (`ReadSlot`,
``Graph.slots``, ``Graph.read_slot``). The corrupted cache keeps one residual per slot; a pass
restarted at a slot (ACDC) takes the writers computed before it as given.

Everything is index arithmetic over contiguous blocks, so the engine reads slices, not dicts.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class ReadSlot:
    """One read point of the forward pass: where ``readers`` read the residual stream.

    ``kind``: "attn" (layer ``layer``'s attention readers), "mlp" (its MLP reader) or "logits"
    (``layer`` = the number of layers). ``reads``: how many writers (a prefix of the writer order)
    the readers read. ``before``: how many writers a pass computes before it reaches the slot, the
    rows a pass restarted here takes as given; before an MLP slot the layer's heads are computed,
    also in a parallel block, where the MLP does not read them (``reads`` < ``before``).
    ``writers``: the writers computed from this slot's reads (the layer's heads, its MLP, none).
    """

    index: int
    kind: str
    layer: int
    readers: slice
    reads: int
    before: int
    writers: slice

    @property
    def name(self) -> str:
        """``a{l}`` (attention), ``m{l}`` (MLP) or ``logits``."""
        return "logits" if self.kind == "logits" else f"{self.kind[0]}{self.layer}"


@dataclass(frozen=True)
class Graph:
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None or == n_heads: no grouped-query attention
    has_mlp: bool = True
    parallel: bool = False  # attention and MLP of a layer read the same residual (GPT-NeoX)

    def __post_init__(self):
        # normalise "no grouped-query attention" to kv == heads so equal shapes compare equal
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        kv = self.n_kv_heads
        if self.n_layers < 1 or self.n_heads < 1 or self.n_heads % kv:
            raise ValueError(f"bad graph shape: layers={self.n_layers} heads={self.n_heads} kv={kv}")

    # ---- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The shape as JSON, as job records store it: layers, heads, kv_heads, n_kv_heads, has_mlp and
        the edge count; ``"parallel": true`` only for parallel blocks (records of sequential models
        keep their bytes). A circuit file stores the first three (and ``parallel``)."""
        out = {"layers": self.n_layers, "heads": self.n_heads, "kv_heads": self.kv_heads,
               "n_kv_heads": self.n_kv_heads, "has_mlp": self.has_mlp, "edges": self.n_edges}
        if self.parallel:
            out["parallel"] = True
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Graph":
        """The graph `to_dict` (or a circuit file's shorter shape) describes."""
        return cls(data["layers"], data["heads"], data.get("n_kv_heads", data.get("kv_heads")),
                   data.get("has_mlp", True), data.get("parallel", False))

    # ---- shape -------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def grouped(self) -> bool:
        return self.kv_heads != self.n_heads

    @property
    def writers_per_layer(self) -> int:
        return self.n_heads + int(self.has_mlp)

    @property
    def attn_readers_per_layer(self) -> int:
        return self.n_heads + 2 * self.kv_heads

    @property
    def readers_per_layer(self) -> int:
        return self.attn_readers_per_layer + int(self.has_mlp)

    @property
    def n_writers(self) -> int:
        return 1 + self.n_layers * self.writers_per_layer

    @property
    def n_readers(self) -> int:
        return self.n_layers * self.readers_per_layer + 1

    # ---- block offsets (the engine's slices) ---------------------------------------------------
    def head_writers(self, layer: int) -> slice:
        start = 1 + layer * self.writers_per_layer
        return slice(start, start + self.n_heads)

    def mlp_writer(self, layer: int) -> int:
        if not self.has_mlp:
            raise ValueError("this graph has no MLP writers")
        return 1 + layer * self.writers_per_layer + self.n_heads

    def writers_before_attn(self, layer: int) -> int:
        """Number of writers visible to the attention readers of ``layer`` (a prefix)."""
        return 1 + layer * self.writers_per_layer

    def writers_before_mlp(self, layer: int) -> int:
        """Number of writers the MLP reader of ``layer`` reads (a prefix): those before the layer
        and the layer's heads in a sequential block; in a parallel block the attention's prefix."""
        return self.writers_before_attn(layer) + (0 if self.parallel else self.n_heads)

    def attn_readers(self, layer: int) -> slice:
        start = layer * self.readers_per_layer
        return slice(start, start + self.attn_readers_per_layer)

    def mlp_reader(self, layer: int) -> int:
        if not self.has_mlp:
            raise ValueError("this graph has no MLP readers")
        return layer * self.readers_per_layer + self.attn_readers_per_layer

    @property
    def logits_reader(self) -> int:
        return self.n_readers - 1

    # ---- read slots ----------------------------------------------------------------------------
    @property
    def n_slots(self) -> int:
        return 2 * self.n_layers + 1

    @property
    def logits_slot(self) -> int:
        return 2 * self.n_layers

    @cached_property
    def slots(self) -> tuple[ReadSlot, ...]:
        """Every read slot, in forward order (``slots[s].index == s``)."""
        out = []
        for l in range(self.n_layers):
            hs, ar = self.head_writers(l), self.attn_readers(l)
            out.append(ReadSlot(2 * l, "attn", l, ar, self.writers_before_attn(l), hs.start, hs))
            if self.has_mlp:
                mw, mr = self.mlp_writer(l), self.mlp_reader(l)
                out.append(ReadSlot(2 * l + 1, "mlp", l, slice(mr, mr + 1), self.writers_before_mlp(l), hs.stop,
                                    slice(mw, mw + 1)))
        lr = self.logits_reader
        out.append(ReadSlot(2 * self.n_layers, "logits", self.n_layers, slice(lr, lr + 1), self.n_writers,
                            self.n_writers, slice(self.n_writers, self.n_writers)))
        return tuple(out)

    def read_slot(self, reader: int) -> int:
        """The read slot of ``reader``."""
        if not 0 <= reader < self.n_readers:
            raise ValueError(f"reader must lie in [0, {self.n_readers}), got {reader}")
        if reader == self.logits_reader:
            return self.logits_slot
        layer, offset = divmod(reader, self.readers_per_layer)
        return 2 * layer + int(offset >= self.attn_readers_per_layer)

    def reader_nodes(self, reader: int) -> list[int]:
        """The writers ``reader`` feeds (its node): a query reader's head, every head of a key/value
        reader's group, an MLP reader's MLP; none for the logits."""
        if reader == self.logits_reader:
            return []
        layer, offset = divmod(reader, self.readers_per_layer)
        heads = self.head_writers(layer).start
        if offset < self.n_heads:
            return [heads + offset]
        if offset < self.attn_readers_per_layer:
            per = self.n_heads // self.kv_heads
            group = (offset - self.n_heads) % self.kv_heads
            return list(range(heads + group * per, heads + (group + 1) * per))
        return [self.mlp_writer(layer)]

    def reader_order(self) -> list[tuple[int, int]]:
        """(reader, read slot) pairs in reverse topological order: the logits, then each layer from
        the last to the first, its MLP reader before its attention readers (last reader first)."""
        out = []
        for slot in reversed(self.slots):
            out += [(r, slot.index) for r in reversed(range(slot.readers.start, slot.readers.stop))]
        return out

    # ---- names ---------------------------------------------------------------------------------
    @cached_property
    def writer_names(self) -> list[str]:
        names = ["input"]
        for l in range(self.n_layers):
            names += [f"a{l}.h{h}" for h in range(self.n_heads)]
            if self.has_mlp:
                names.append(f"m{l}")
        return names

    @cached_property
    def reader_names(self) -> list[str]:
        kv = "g" if self.grouped else "h"
        names = []
        for l in range(self.n_layers):
            names += [f"a{l}.h{h}<q>" for h in range(self.n_heads)]
            names += [f"a{l}.{kv}{g}<k>" for g in range(self.kv_heads)]
            names += [f"a{l}.{kv}{g}<v>" for g in range(self.kv_heads)]
            if self.has_mlp:
                names.append(f"m{l}")
        names.append("logits")
        return names

    @cached_property
    def writer_index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.writer_names)}

    @cached_property
    def reader_index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.reader_names)}

    # ---- edges ---------------------------------------------------------------------------------
    @cached_property
    def _reader_visible(self) -> torch.Tensor:
        """For each reader, how many writers (a prefix of the writer order) it reads."""
        vis = torch.empty(self.n_readers, dtype=torch.long)
        for l in range(self.n_layers):
            vis[self.attn_readers(l)] = self.writers_before_attn(l)
            if self.has_mlp:
                vis[self.mlp_reader(l)] = self.writers_before_mlp(l)
        vis[self.logits_reader] = self.n_writers
        return vis

    @cached_property
    def valid(self) -> torch.Tensor:
        """Boolean [writers, readers]: True where the edge exists."""
        return torch.arange(self.n_writers)[:, None] < self._reader_visible[None, :]

    @cached_property
    def n_edges(self) -> int:
        return int(self._reader_visible.sum())

    @cached_property
    def edge_index(self) -> torch.Tensor:
        """[n_edges, 2] (writer, reader) pairs in writer-major order."""
        return self.valid.nonzero()

    def edge_name(self, writer: int, reader: int) -> str:
        return f"{self.writer_names[writer]}->{self.reader_names[reader]}"

    @cached_property
    def edge_names(self) -> list[str]:
        w, r = self.writer_names, self.reader_names
        return [f"{w[i]}->{r[j]}" for i, j in self.edge_index.tolist()]

    def parse_edge(self, name: str) -> tuple[int, int]:
        """``"a3.h2->a5.h1<q>"`` -> (writer index, reader index); ValueError if unknown/invalid."""
        try:
            src, dst = name.split("->")
            i, j = self.writer_index[src.strip()], self.reader_index[dst.strip()]
        except (ValueError, KeyError):
            raise ValueError(f"unknown edge {name!r} for this graph") from None
        if not self.valid[i, j]:
            layer = j // self.readers_per_layer  # (the logits reader is no layer's MLP reader)
            heads = self.head_writers(layer)
            if self.parallel and self.has_mlp and j == self.mlp_reader(layer) and heads.start <= i < heads.stop:
                raise ValueError(f"edge {name!r} does not exist: in a parallel block the MLP does not read "
                                 f"its own layer's heads")
            raise ValueError(f"edge {name!r} goes backwards in the forward pass")
        return i, j

    # ---- effective edges -------------------------------------------------------------------------
    def effective_edges(self, edges: torch.Tensor) -> torch.Tensor:
        """The kept edges that lie on a path input -> ... -> logits through kept edges: bool [W, R].

        ``edges``: bool (or any non-zero = kept) [W, R]. A writer is *reached* when it is the input or
        a kept edge from a reached writer enters one of its readers (a head through its query, or its
        key/value group's key or value reader); a reader is *needed* when its node's output reaches
        the logits through kept edges (a key/value group reader when any head of the group does).
        An edge is effective when it is kept, its writer is reached and its reader needed: the
        others carry no clean-minus-corrupted difference to the logits (interchange ablation) and
        removing them changes nothing.
        """
        kept = (edges != 0).cpu() & self.valid
        H, G = self.n_heads, self.kv_heads
        reached = torch.zeros(self.n_writers, dtype=torch.bool)
        reached[0] = True
        for l in range(self.n_layers):
            ar, hs = self.attn_readers(l), self.head_writers(l)
            fed = (kept[:, ar] & reached[:, None]).any(0)  # [H + 2G] readers with a kept reached input
            groups = fed[H:H + G] | fed[H + G:]
            reached[hs] = fed[:H] | groups.repeat_interleave(H // G)
            if self.has_mlp:
                reached[self.mlp_writer(l)] = (kept[:, self.mlp_reader(l)] & reached).any()
        need = torch.zeros(self.n_readers, dtype=torch.bool)
        need[self.logits_reader] = True
        for l in reversed(range(self.n_layers)):
            if self.has_mlp:
                mw = self.mlp_writer(l)
                need[self.mlp_reader(l)] = (kept[mw] & need).any()
            hs, ar = self.head_writers(l), self.attn_readers(l)
            heads = (kept[hs] & need).any(1)
            groups = heads.view(G, H // G).any(1)
            need[ar.start:ar.start + H] = heads
            need[ar.start + H:ar.start + H + G] = groups
            need[ar.start + H + G:ar.stop] = groups
        return kept & reached[:, None] & need[None, :]

    def full_mask(self, dtype=torch.float32) -> torch.Tensor:
        return self.valid.to(dtype)

    def summary(self) -> dict:
        return {
            "layers": self.n_layers,
            "heads": self.n_heads,
            "kv_heads": self.kv_heads,
            "writers": self.n_writers,
            "readers": self.n_readers,
            "edges": self.n_edges,
            "parallel": self.parallel,
        }
