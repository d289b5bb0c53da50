"""The masked forward engine: a transformer whose edges can each be replaced by corrupted (or zero)
activations, exactly and differentiably.

Per example pair (clean x, corrupted x~):

1. corrupted pass (no grad): every writer's output y~_w and the corrupted residual stream at every
   read slot (`CorruptedCache`; reusable across steps);
2. masked pass: a writer stack D = [y_w - y~_w] of shape [writers, B*S*d]; reader r reads
   ``corrupted_residual + sum_w z[w, r] * D_w`` (eq. 3 of Bhaskar et al. 2024), one matrix product
   per read point. Node masks scale a writer's row of the edge mask.

All masks 1 reproduce the model; all masks 0 reproduce the corrupted run; zero ablation uses
y~ = 0. The attention output bias is a constant that rides along in the residual and is never
ablated.

The masked pass is written once (`MaskedModel._pass`, `MaskedModel._layer`): the embedding, then per
layer its read points (the attention readers of the heads the pass computes, then the MLP reader),
then the logits; at each one a *read kernel* mixes the writer stack into the readers' inputs and
takes the outputs back onto the stack. The kernel is chosen once per pass:

- `_Dense` (autograd, or an adapter that computes no head subsets): every writer; a read is an
  autograd function over a prefix of the one preallocated stack (`_ReadMix`), whose gradient is
  accumulated in place in one buffer (`_StackGrad`), so a read point costs one GEMM forward and two
  backward, with no growing concatenations and no per-read gradient tensors. When every edge has
  the same coefficient (the full model; EAP's and eap-mask-ig's masks) a read is a running sum of
  the stack and each writer's gradient one row (`_UniformRead`). In a parallel block (``graph.parallel``:
  GPT-NeoX with ``use_parallel_residual``) the attention and the MLP of a layer read the same
  writers, and the kernel reads all of the layer's readers in one read point, so the writers of
  the layer before hand their gradient on once. ``MaskedModel(checkpoint=True)`` recomputes each
  layer in the backward pass.
- `_Pruned` (no autograd: evaluation, ACDC's trials): only the heads and MLPs that a chain of kept
  edges connects to the logits (`MaskedModel.live_writers`); a read gathers the rows of the writers
  with a non-zero coefficient when they are few. A sparse circuit costs a fraction of the full
  pass, exactly.
- `_Copies` (a `_Pruned` retry with ``column=``): K copies of a restarted pass whose masks differ
  in one reader's column (ACDC's batched trials), in one pass.

Incremental re-evaluation (ACDC, EAP-IG's interpolated runs) goes through an explicit object:
``state = engine.begin(...)`` prepares a batch and fills its writer stack (`PassState`);
``engine.retry(state, edge_mask, slot=s, ...)`` runs the pass from read slot ``s`` on (the
`Graph.slots` numbering), taking the stack's rows of the writers before it as given, and leaves its
own rows in the stack. A retry at an attention slot can recompute only some heads of that layer
(``heads``), try K candidate columns of one reader at once (``column``) and keep each later read's
part from the writers before the slot for the next retries at that slot (``share_reads``).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from .errors import UserError

ABLATIONS = ("interchange", "zero")


class _StackGrad:
    """The gradient of the loss with respect to the writer stack D, accumulated in place.

    Every reader reads a prefix of D, so the gradient of a writer's rows is the sum of all later
    readers' contributions. Backward visits the read points from last to first; each adds its
    contribution into this one buffer (a fused ``addmm_``, no per-read gradient tensors for autograd
    to sum), and the read point right after a writer hands that writer its finished rows.
    """

    __slots__ = ("grad", "suffix")

    def __init__(self):
        self.grad = None
        self.suffix = None  # uniform masks (`_UniformRead`): one row, the same for every writer


class _ReadMix(torch.autograd.Function):
    """out[r] = base + sum_w mask[w, r] * buf[w] over the first ``mask.shape[0]`` writer rows.

    ``buf`` is the writer stack D (read, never differentiated). ``latest`` is the output of the
    writer(s) computed just before this read point, occupying the last ``latest.shape[0]`` rows of
    the prefix (D = latest - y~ there); it is an input only so autograd routes the finished
    gradient of those rows back to it. ``rows`` (optional) picks token rows of a ``[W, T, d]`` view
    of the stack (the logits reader reads only the scored positions).
    """

    @staticmethod
    def forward(ctx, mask, base, buf, rows, d, state, latest):
        W = mask.shape[0]
        src = buf[:W] if rows is None else buf[:W].view(W, -1, d)[:, rows].reshape(W, -1)
        out = torch.addmm(base.reshape(1, -1), mask.t(), src)
        ctx.save_for_backward(mask)
        ctx.src, ctx.rows, ctx.d, ctx.state = src, rows, d, state
        ctx.full = buf.shape[1]
        ctx.n_latest = 0 if latest is None else latest.shape[0]
        ctx.latest_shape = None if latest is None else latest.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        need = ctx.needs_input_grad
        gmask = ctx.src @ grad.t() if need[0] else None
        glatest = None
        if need[6]:
            W, st = mask.shape[0], ctx.state
            if ctx.rows is not None:  # only the scored tokens were read
                g = mask @ grad
                if st.grad is None:
                    st.grad = g.new_zeros(W, ctx.full)
                st.grad[:W].view(W, -1, ctx.d).index_add_(1, ctx.rows, g.view(W, -1, ctx.d))
            elif st.grad is None:  # the last read point of the forward: it covers every writer
                st.grad = mask @ grad
            else:
                st.grad[:W].addmm_(mask, grad)
            glatest = st.grad[W - ctx.n_latest:W].view(ctx.latest_shape)
        return gmask, None, None, None, None, None, glatest


class _UniformRead(torch.autograd.Function):
    """`_ReadMix` when every kept coefficient is the same number ``c`` (the full model; EAP and
    eap-mask-ig's masks ``alpha * 1``): every reader of the read point sees ``base + c * running``, where
    ``running`` is the sum of the stack's first W rows, kept up to date as writers are pushed. The
    read costs one row instead of a [R, W] x [W, N] product, and backward hands every writer the same
    gradient row, ``c`` times the sum of the gradients of every reader after it (``state.suffix``),
    instead of accumulating a [W, N] stack gradient. The mask gradient (``buf[:W] @ grad.T``, EAP's
    scores) is the one product left.
    """

    @staticmethod
    def forward(ctx, mask, base, buf, rows, d, state, latest, running, c):
        W, R = mask.shape
        run = running if rows is None else running.view(-1, d)[rows].reshape(-1)
        out = torch.add(base.reshape(-1), run, alpha=c).expand(R, -1).contiguous()
        ctx.buf, ctx.rows, ctx.d, ctx.state, ctx.c, ctx.W = buf, rows, d, state, c, W
        ctx.full = buf.shape[1]
        ctx.latest_shape = None if latest is None else latest.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        need = ctx.needs_input_grad
        W, st, d = ctx.W, ctx.state, ctx.d
        src = ctx.buf[:W] if ctx.rows is None else ctx.buf[:W].view(W, -1, d)[:, ctx.rows].reshape(W, -1)
        gmask = src @ grad.t() if need[0] else None
        glatest = None
        if need[6]:
            g = grad.sum(0) * ctx.c
            if st.suffix is None:
                st.suffix = g.new_zeros(ctx.full)
            if ctx.rows is not None:  # only the scored tokens were read
                st.suffix = st.suffix.view(-1, d).index_add(0, ctx.rows, g.view(-1, d)).view(-1)
            else:  # a new tensor: the rows handed out below must not change later
                st.suffix = st.suffix + g
            n = ctx.latest_shape[0]
            glatest = st.suffix.expand(n, -1).view(ctx.latest_shape)
        return gmask, None, None, None, None, None, glatest, None, None


@dataclass
class CorruptedCache:
    """What the masked pass needs from the corrupted run of one batch.

    ``writers``: y~ [W, B*S*d] (None for zero ablation: y~ = 0); ``resid``: the corrupted residual at
    each read point, [2L+1, B*S*d] for interchange (before attention l at 2l, before MLP l at 2l+1,
    final at 2L) or [2L+1, d] of output-bias constants for zero ablation. In a parallel block the MLP
    reads the residual before the layer: slot 2l+1 holds what slot 2l holds.
    """

    ablation: str
    shape: tuple[int, int]
    writers: torch.Tensor | None
    resid: torch.Tensor

    def resid_at(self, slot: int, rows=None, d=None) -> torch.Tensor:
        r = self.resid[slot]
        if self.writers is None:  # zero ablation: a constant per feature, broadcast over tokens
            n_tokens = self.shape[0] * self.shape[1] if rows is None else len(rows)
            return r.expand(n_tokens, -1).reshape(-1)
        return r if rows is None else r.view(-1, d)[rows].reshape(-1)


@dataclass(eq=False)
class PassState:
    """A batch prepared for incremental re-evaluation (`MaskedModel.begin`, `MaskedModel.retry`).

    ``ids`` [B, S] and ``attention_mask`` on the engine's device; ``rows`` (flat token rows of the
    scored positions, None = every position) and ``n_positions``; ``corrupted``: the batch's
    `CorruptedCache`; ``stack``: the writer stack D [writers, B*S*d] of the last pass run on it (each
    retry rewrites the rows of the writers it computes). The engine also keeps here the later reads'
    shared parts of one read slot (``share_reads``): they hold while the retries stay at that slot
    and keep the edges from the writers before it into later readers.
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor | None
    rows: torch.Tensor | None
    n_positions: int
    corrupted: CorruptedCache
    stack: torch.Tensor
    shared: dict = field(default_factory=dict, repr=False)  # (slot, readers) -> [readers, tokens * d]
    shared_for: tuple | None = field(default=None, repr=False)  # (slot, the later edges they were made with)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.ids.shape)


class MaskedModel(torch.nn.Module):
    """A loaded model whose edges and nodes can be masked.

    ``MaskedModel(model)(clean_ids, corrupted_ids, attention_mask=None, edge_mask=None,
    node_mask=None, positions=None, ablation="interchange", corrupted=None)`` -> logits
    ``[B, P, vocab]``. ``edge_mask`` is ``[writers, readers]`` (entries outside ``graph.valid`` are
    ignored), ``node_mask`` is ``[writers]``; None means all ones. ``positions`` is a LongTensor
    ``[B, P]`` or ``[B]`` of token indices to score, or None for all. Pass ``corrupted=`` a
    `CorruptedCache` from `corrupted_cache` to skip the corrupted pass.

    Incremental re-evaluation: `begin` (the same arguments, plus ``stack``) returns a `PassState`,
    and `retry` reruns the pass from a read slot on with another mask.
    """

    def __init__(self, model, checkpoint: bool = False):
        super().__init__()
        self.model = model
        # recompute each layer's activations in the backward pass instead of keeping them (large
        # models); the writer stack itself is always kept
        self.checkpoint = checkpoint
        self.adapter = model.adapter
        self.graph = model.graph
        self._L = model.graph.n_layers

    # ---- helpers ---------------------------------------------------------------------------------
    @property
    def device(self):
        return self.model.device

    @property
    def dtype(self):
        return self.model.dtype

    def _prep(self, ids, attention_mask):
        if ids.dim() != 2:
            raise UserError(f"token ids must be [batch, seq], got shape {tuple(ids.shape)}")
        ids = ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
            if attention_mask.shape != ids.shape:
                raise UserError("attention_mask must have the shape of the token ids")
        return ids, attention_mask

    def _rows(self, positions, B, S):
        """Flat token rows (b*S + s) of the scored positions, and P; None rows = every position."""
        if positions is None:
            return None, S
        positions = torch.as_tensor(positions, device=self.device).long()
        if positions.dim() == 1:
            positions = positions[:, None]
        if positions.shape[0] != B:
            raise UserError(f"positions has {positions.shape[0]} rows for a batch of {B}")
        if positions.numel() and (positions.min() < 0 or positions.max() >= S):
            raise UserError(f"positions must lie in [0, {S})")
        rows = (torch.arange(B, device=self.device)[:, None] * S + positions).reshape(-1)
        return rows, positions.shape[1]

    def _bias_const(self, layer):
        b = self.adapter.attn_out_bias(layer)
        return None if b is None else b.to(self.dtype)

    # ---- plain passes ------------------------------------------------------------------------------
    @torch.no_grad()
    def _plain(self, ids, attention_mask, capture):
        """One ordinary forward. capture=True also returns every writer's output and the residual
        at every read point (the corrupted cache); otherwise the final residual only."""
        a, g = self.adapter, self.graph
        B, S = ids.shape
        ctx = a.context(S, attention_mask, self.device)
        resid = a.embed(ids).to(self.dtype)
        if capture:
            writers = resid.new_empty(g.n_writers, B, S, resid.shape[-1])
            slots = resid.new_empty(g.n_slots, B, S, resid.shape[-1])
            writers[0] = resid
        for l in range(self._L):
            if capture:
                slots[2 * l] = resid
                heads = a.attention(l, resid[None], ctx, per_head=True)
                writers[g.head_writers(l)] = heads
                attn = heads.sum(0)
            else:
                attn = a.attention(l, resid[None], ctx, per_head=False)
            before = resid
            resid = resid + attn
            bias = self._bias_const(l)
            if bias is not None:
                resid = resid + bias
            mlp_in = before if g.parallel else resid  # a parallel block's MLP reads the layer's input
            if capture:
                slots[2 * l + 1] = mlp_in
            m = a.mlp(l, mlp_in)
            if capture:
                writers[g.mlp_writer(l)] = m
            resid = resid + m
        if capture:
            slots[g.logits_slot] = resid
            return writers.view(g.n_writers, -1), slots.view(g.n_slots, -1)
        return resid

    def corrupted_cache(self, corrupted_ids=None, attention_mask=None, ablation="interchange",
                        shape=None) -> CorruptedCache:
        """Run the corrupted pass once (interchange) or build the bias constants (zero)."""
        if ablation not in ABLATIONS:
            raise UserError(f"unknown ablation {ablation!r}; choose one of {', '.join(ABLATIONS)}")
        if ablation == "zero":
            if corrupted_ids is not None:
                shape = tuple(corrupted_ids.shape)
            if shape is None:
                raise ValueError("zero ablation needs the batch shape (pass corrupted_ids or shape)")
            d = self.adapter.d_model
            consts = torch.zeros(self.graph.n_slots, d, device=self.device, dtype=self.dtype)
            acc = torch.zeros(d, device=self.device, dtype=self.dtype)
            for l in range(self._L):
                consts[2 * l] = acc
                b = self._bias_const(l)
                if b is not None:
                    acc = acc + b
                # a parallel block's MLP reads the layer's input, without this layer's output bias
                consts[2 * l + 1] = consts[2 * l] if self.graph.parallel else acc
            consts[self.graph.logits_slot] = acc
            return CorruptedCache("zero", tuple(shape), None, consts)
        if corrupted_ids is None:
            raise UserError("interchange ablation needs corrupted token ids")
        ids, attention_mask = self._prep(corrupted_ids, attention_mask)
        writers, resid = self._plain(ids, attention_mask, capture=True)
        return CorruptedCache("interchange", tuple(ids.shape), writers, resid)

    @torch.no_grad()
    def reference(self, clean_ids, attention_mask=None, positions=None) -> torch.Tensor:
        """The full model's logits [B, P, vocab] at ``positions`` (no grad)."""
        ids, attention_mask = self._prep(clean_ids, attention_mask)
        B, S = ids.shape
        resid = self._plain(ids, attention_mask, capture=False)
        rows, P = self._rows(positions, B, S)
        x = resid.reshape(B * S, -1)
        if rows is not None:
            x = x[rows]
        return self.adapter.unembed(x).view(B, P, -1)

    # ---- the masked pass -----------------------------------------------------------------------------
    def forward(self, clean_ids, corrupted_ids=None, attention_mask=None, edge_mask=None,
                node_mask=None, positions=None, ablation="interchange", corrupted=None):
        """The masked pass; see the class docstring. Without autograd (``torch.no_grad()``:
        evaluation) it computes only the writers that can reach the logits through kept edges
        (`live_writers`) when the adapter computes head subsets."""
        state = self._state(clean_ids, corrupted_ids, attention_mask, positions, ablation, corrupted,
                            zeros=self._prunes())
        return self._pass(state, self._effective_mask(edge_mask, node_mask))

    def begin(self, clean_ids, corrupted_ids=None, attention_mask=None, edge_mask=None, node_mask=None,
              positions=None, ablation="interchange", corrupted=None, stack=None) -> PassState:
        """Prepare a batch for `retry`: its `PassState`, whose writer stack is filled by one masked
        pass (without autograd) of ``edge_mask``/``node_mask`` (None: the full model). The arguments
        are `forward`'s.

        ``stack`` (a ``[writers, B*S*d]`` tensor in the engine's dtype): the batch's writer stack
        under those masks, already computed (EAP-IG: the clean run's y - y~, the full model's);
        no pass runs and the state uses it in place.
        """
        with torch.no_grad():
            state = self._state(clean_ids, corrupted_ids, attention_mask, positions, ablation, corrupted,
                                stack=stack, zeros=self._prunes())
            if stack is None:
                self._pass(state, self._effective_mask(edge_mask, node_mask))
        return state

    def retry(self, state: PassState, edge_mask=None, node_mask=None, *, slot=None, heads=None, column=None,
              share_reads=False) -> torch.Tensor:
        """The masked pass of ``state``'s batch from read slot ``slot`` on (`Graph.slots`; default
        0, or ``column``'s reader's slot): the stack's rows of the writers computed before the slot
        (``graph.slots[slot].before``) are taken as given, every later row the pass computes is
        overwritten in place, so afterwards the stack holds this pass's writer stack and a later
        retry whose masks differ only in readers at or after some slot can start there. Returns the
        logits ``[B, P, vocab]``; with autograd on, gradients reach the masks as in `forward`.

        The caller vouches that the given rows hold what ``edge_mask`` makes them (ACDC: every
        reader before the slot is unchanged since the stack was filled). Without autograd only the
        live writers' rows are written (`live_writers`), so a retry must not read a writer before
        the slot that was dead in the pass that filled them (ACDC fills them with the full model).

        Retries without autograd on an adapter with head subsets only (ValueError otherwise):

        - ``heads`` (at an attention slot 2l; head indices of layer l): compute only these heads of
          the layer and take the other heads' rows as given (ACDC: a trial changes one reader's
          edges, so only the heads that reader feeds, and heads a rejected trial left with the
          trial's rows, need computing).
        - ``column=(reader, values)``, ``values`` ``[K, writers]``: K copies of the pass in one, copy
          k's edge mask being ``edge_mask`` with ``reader``'s column replaced by ``values[k]`` (ACDC's
          batched trials). ``slot`` must be the reader's slot. Returns ``[K * B, P, vocab]``, copy k in
          rows ``k*B:(k+1)*B``. The copies share the rows before the slot (read once) and every
          later read's part from them; their own rows live in a scratch buffer of the call, so the
          stack keeps what it held (at slot 0 its input row is rewritten with the same values).
          With ``heads``, each copy computes those heads and the heads ``reader`` feeds; the other
          live heads of the layer are taken from the stack, the same in every copy.
        - ``share_reads``: keep each later read's part from the writers before the slot in the state
          and reuse it in the next retries at this slot (ACDC's trials at one slot, single or
          batched); the first such retry computes it. Memory: a ``[readers, tokens * d]`` row block
          per later read point. Kept parts are dropped by a retry at another slot or when the edges
          from those writers into later readers change.
        """
        g = self.graph
        if column is not None:
            column = self._check_column(column, node_mask)
            slot = g.read_slot(column[0]) if slot is None else slot
        slot = 0 if slot is None else int(slot)
        if not 0 <= slot < g.n_slots:
            raise ValueError(f"slot must lie in [0, {g.n_slots - 1}], got {slot}")
        if column is not None and g.read_slot(column[0]) != slot:
            raise ValueError(f"column's reader {column[0]} is read at slot {g.read_slot(column[0])}, not at "
                             f"slot {slot}")
        if heads is not None and g.slots[slot].kind != "attn":
            raise ValueError(f"heads= needs a retry at an attention slot (even, < {g.logits_slot}), got slot {slot}")
        if (heads is not None or share_reads) and not self._prunes():
            raise ValueError("heads=, column= and share_reads= need a retry without autograd (torch.no_grad()) "
                             "on an adapter with head_subsets")
        mask = self._effective_mask(edge_mask, node_mask)
        return self._pass(state, mask, slot, heads, column, self._shared_reads(state, mask, slot, share_reads))

    def _prunes(self) -> bool:
        """Whether a pass now runs the pruned kernels (no autograd, an adapter with head subsets)."""
        return not torch.is_grad_enabled() and getattr(self.adapter, "head_subsets", False)

    def _state(self, clean_ids, corrupted_ids, attention_mask, positions, ablation, corrupted, stack=None,
               zeros=False) -> PassState:
        """A batch's `PassState`: checked ids, the corrupted cache, scored rows and a writer stack
        (new: zeros when ``zeros``, so that rows a pruned pass leaves unwritten are finite)."""
        g = self.graph
        ids, attention_mask = self._prep(clean_ids, attention_mask)
        B, S = ids.shape
        if corrupted is None:
            corrupted = self.corrupted_cache(corrupted_ids, attention_mask, ablation, shape=(B, S))
        elif corrupted.shape != (B, S):
            raise UserError(f"corrupted cache is for a batch of shape {corrupted.shape}, not {(B, S)}")
        rows, P = self._rows(positions, B, S)
        N = B * S * self.adapter.d_model
        if stack is None:
            stack = (torch.zeros if zeros else torch.empty)(g.n_writers, N, device=self.device, dtype=self.dtype)
        elif tuple(stack.shape) != (g.n_writers, N) or stack.dtype != self.dtype:
            raise ValueError(f"stack must be {self.dtype} of shape {(g.n_writers, N)}, got "
                             f"{stack.dtype} {tuple(stack.shape)}")
        return PassState(ids, attention_mask, rows, P, corrupted, stack)

    def _shared_reads(self, state, mask, slot, share) -> dict | None:
        """The state's kept later reads for a retry at ``slot`` (None: not shared). They were made
        from the rows before one slot and the edges from them into later readers: a retry at
        another slot rewrites or passes those rows, and other edges make other reads."""
        later = mask[:self.graph.slots[slot].before, self.graph.slots[slot].readers.stop:]
        if state.shared_for is not None and (state.shared_for[0] != slot or
                                             (share and not torch.equal(state.shared_for[1], later))):
            state.shared.clear()
            state.shared_for = None
        if not share:
            return None
        if state.shared_for is None:
            state.shared_for = (slot, later.clone())
        return state.shared

    def _pass(self, state, mask, start=0, heads=None, column=None, shared=None):
        """The masked pass of ``state``'s batch from read slot ``start`` on, with the read kernel
        chosen once (module docstring): the embedding (from slot 0), each layer's read points, the
        logits."""
        a, g = self.adapter, self.graph
        if not self._prunes():
            k = _Dense(self, state, mask, start)
        elif column is None:
            k = _Pruned(self, state, mask, start, heads, shared)
        else:
            k = _Copies(self, state, mask, start, heads, shared, column)
        if start == 0:
            k.push(slice(0, 1), a.embed(state.ids).to(self.dtype)[None])
        for l in range(start // 2, g.n_layers):
            if k.recompute:  # re-running a layer rewrites its own stack rows with the same values
                k.pending = [torch.utils.checkpoint.checkpoint(self._checkpointed, k, l, k.latest(),
                                                               use_reentrant=False)]
            else:
                self._layer(k, l)
        final = k.read(g.logits_slot, g.slots[g.logits_slot].readers, state.rows)
        return a.unembed(final.view(-1, state.n_positions, k.d))

    def _layer(self, k, l):
        """Layer ``l``'s read points under kernel ``k``: its attention readers (of the heads the pass
        computes; none in a retry from the layer's MLP slot), then its MLP reader."""
        a, g = self.adapter, self.graph
        B, S, d = k.copies * k.B, k.S, k.d
        hs = g.head_writers(l)
        mw, mr = g.mlp_writer(l), g.mlp_reader(l)
        if k.start <= 2 * l:
            heads = k.heads(l)
            if heads is None and g.parallel and k.joint:  # attention and MLP read the same writers: one read point
                # (its MLP reader comes right after its attention readers), so the writers before it get
                # their finished gradient once
                ar = g.attn_readers(l)
                xa, xm = k.read(2 * l, slice(ar.start, mr + 1)).split([mr - ar.start, 1])
                k.push(hs, a.attention(l, xa.view(-1, B, S, d), k.ctx, per_head=True))
                k.push(slice(mw, mw + 1), a.mlp(l, xm.view(B, S, d))[None])
                return
            if heads is None:
                x = k.read(2 * l, g.attn_readers(l))
                k.push(hs, a.attention(l, x.view(-1, B, S, d), k.ctx, per_head=True))
            elif heads:
                sub = torch.tensor(heads, device=self.device)
                x = k.read(2 * l, self._head_readers(l, sub))
                k.push(hs.start + sub, a.attention(l, x.view(-1, B, S, d), k.ctx, per_head=True, heads=sub))
        if k.mlp_live(l):
            x = k.read(2 * l + 1, slice(mr, mr + 1))
            k.push(slice(mw, mw + 1), a.mlp(l, x.view(B, S, d))[None])

    def _checkpointed(self, k, l, latest):
        """`_layer` as a function of the writers pushed before it, returning those it pushes
        (gradient checkpointing)."""
        k.pending = [] if latest is None else [latest]
        self._layer(k, l)
        return k.latest()

    def _head_readers(self, l, sub):
        """The readers of heads ``sub`` (a LongTensor of head indices) of layer ``l``: their query
        readers, then the key and the value readers of their key/value groups."""
        g = self.graph
        ar, H, G = g.attn_readers(l), g.n_heads, g.kv_heads
        groups, _ = self.adapter.kv_groups(sub)
        return torch.cat([ar.start + sub, ar.start + H + groups, ar.start + H + G + groups])

    def _check_column(self, column, node_mask):
        """`retry`'s ``column`` validated: (reader, values [K, W] on the engine's device and dtype,
        node mask applied)."""
        g = self.graph
        try:
            reader, values = column
            reader = int(reader)
        except (TypeError, ValueError):
            raise ValueError("column must be a pair (reader, values [K, writers])") from None
        if not self._prunes():
            raise ValueError("column needs a retry without autograd (torch.no_grad()) on an adapter with "
                             "head_subsets")
        if not 0 <= reader < g.n_readers:
            raise ValueError(f"column's reader must lie in [0, {g.n_readers}), got {reader}")
        values = torch.as_tensor(values)
        if values.dim() != 2 or values.shape[1] != g.n_writers or values.shape[0] < 1:
            raise ValueError(f"column's values must be [K >= 1, {g.n_writers}], got {tuple(values.shape)}")
        values = values.to(device=self.device, dtype=self.dtype)
        if node_mask is not None:
            values = values * node_mask.to(device=self.device, dtype=self.dtype)[None, :]
        return reader, values

    def live_writers(self, mask: torch.Tensor) -> torch.Tensor:
        """Writers whose output can reach the logits under ``mask`` (effective, [W, R]): bool [W].

        A writer is live when a kept edge (non-zero mask) leads from it to the logits reader or to
        a reader of a live node (a head's query reader, its key/value group's readers, an MLP's
        reader). A dead writer's output is read with coefficient 0 everywhere that matters, so
        leaving it out of a forward pass changes nothing.
        """
        g = self.graph
        valid = g.valid.to(mask.device)
        nz = (mask != 0) & valid
        if bool((nz == valid).all()):  # every edge kept: every writer reaches the logits
            return torch.ones(g.n_writers, dtype=torch.bool, device=mask.device)
        need = torch.zeros(g.n_readers, dtype=torch.bool, device=mask.device)
        need[g.logits_reader] = True
        alive = torch.zeros(g.n_writers, dtype=torch.bool, device=mask.device)
        H, G = g.n_heads, g.kv_heads
        for l in reversed(range(self._L)):
            mw = g.mlp_writer(l)
            alive[mw] = (nz[mw] & need).any()
            need[g.mlp_reader(l)] = alive[mw]
            hs, ar = g.head_writers(l), g.attn_readers(l)
            heads = (nz[hs] & need).any(1)
            alive[hs] = heads
            groups = heads.view(G, H // G).any(1)
            need[ar.start:ar.start + H] = heads
            need[ar.start + H:ar.start + H + G] = groups
            need[ar.start + H + G:ar.stop] = groups
        alive[0] = (nz[0] & need).any()
        return alive

    def _uniform_value(self, mask) -> float | None:
        """The one value every edge of the graph has in ``mask``, or None when they differ."""
        with torch.no_grad():
            vals = mask.detach()[self.graph.valid.to(mask.device)]
            first = vals[:1]
            if not len(first) or not bool((vals == first).all()):
                return None
            return float(first)

    def _effective_mask(self, edge_mask, node_mask):
        g = self.graph
        shape = (g.n_writers, g.n_readers)
        if edge_mask is None:
            mask = torch.ones(shape, device=self.device, dtype=self.dtype)
        else:
            if tuple(edge_mask.shape) != shape:
                raise UserError(f"edge_mask must have shape {shape} (writers x readers), got {tuple(edge_mask.shape)}")
            mask = edge_mask.to(device=self.device, dtype=self.dtype)
        if node_mask is not None:
            if tuple(node_mask.shape) != (g.n_writers,):
                raise UserError(f"node_mask must have shape ({g.n_writers},), got {tuple(node_mask.shape)}")
            mask = mask * node_mask.to(device=self.device, dtype=self.dtype)[:, None]
        return mask


# ---- read kernels: how one pass reads the writer stack and writes it ------------------------------------
class _Kernel:
    """What every read kernel holds: the pass's batch, mask, restart slot and stack.

    The pass (`MaskedModel._pass`) asks a kernel which heads of a layer to compute (``heads``: None =
    all), whether an MLP runs (``mlp_live``), for the readers' inputs at a read point (``read``,
    ``[readers, copies * tokens * d]``) and hands it the outputs of the writers it computed
    (``push``: D = out - y~ onto the stack).
    """

    joint = False  # a parallel layer's attention and MLP readers read in one read point
    recompute = False  # gradient checkpointing: each layer recomputed in the backward pass
    copies = 1

    def __init__(self, engine, state, mask, start):
        self.graph, self.adapter = engine.graph, engine.adapter
        self.B, self.S = state.shape
        self.d = engine.adapter.d_model
        self.N = self.B * self.S * self.d
        self.buf, self.corrupted, self.ytil = state.stack, state.corrupted, state.corrupted.writers
        self.mask, self.start = mask, start
        self.ctx = engine.adapter.context(self.S, state.attention_mask, engine.device)

    def base(self, slot, token_rows):
        """The corrupted residual the readers of ``slot`` start from."""
        return self.corrupted.resid_at(slot, token_rows, self.d)


class _Dense(_Kernel):
    """Every writer, reads as autograd functions (`_ReadMix`; `_UniformRead` when every edge has one
    coefficient): the pass with gradients, and without them on adapters that compute no head
    subsets. ``pending``: the outputs pushed since the last read, which the next read point hands
    its finished gradient (``latest``)."""

    joint = True

    def __init__(self, engine, state, mask, start):
        super().__init__(engine, state, mask, start)
        self.grad = _StackGrad()
        self.recompute = engine.checkpoint and torch.is_grad_enabled()
        # one coefficient on every edge (the full model, EAP): reads are one running sum
        self.c = None if self.recompute or start else engine._uniform_value(mask)
        self.running = None if self.c is None else torch.zeros(self.N, device=engine.device, dtype=engine.dtype)
        self.pending = []

    def heads(self, l):
        return None

    def mlp_live(self, l):
        return True

    def latest(self):
        """The writer outputs pushed since the last read (None after a restart: a given prefix)."""
        out, self.pending = self.pending, []
        return None if not out else out[0] if len(out) == 1 else torch.cat(out)

    def push(self, index, out):  # index: a slice of writer rows; out [n, B, S, d]
        flat = out.detach().reshape(out.shape[0], self.N)
        if self.ytil is None:
            self.buf[index] = flat
        else:
            torch.sub(flat, self.ytil[index], out=self.buf[index])
        if self.running is not None:
            self.running.add_(self.buf[index].sum(0))
        self.pending.append(out)

    def read(self, slot, readers, token_rows=None):
        m = self.mask[:self.graph.slots[slot].reads, readers]
        base, latest = self.base(slot, token_rows), self.latest()
        if self.c is not None:
            return _UniformRead.apply(m, base, self.buf, token_rows, self.d, self.grad, latest, self.running, self.c)
        return _ReadMix.apply(m, base, self.buf, token_rows, self.d, self.grad, latest)


class _Pruned(_Kernel):
    """Without autograd, only live writers (`MaskedModel.live_writers`): dead heads and MLPs and
    their readers are skipped; a read point gathers the rows of the writers with a non-zero
    coefficient when they are few, and otherwise reads the stack in place. Equal to the dense pass
    up to float rounding. Stack rows of dead writers are left as they were: every coefficient that
    reads them is 0 (a kept edge into a live reader makes its writer live), so they must only be
    finite: a new stack starts at zero, and a given one was filled by an earlier pass.

    ``fresh`` (`MaskedModel.retry`'s ``heads``): the heads of the restart slot's layer to compute.
    ``shared``: the later reads' parts from the writers before the restart slot (``first`` rows), kept
    across the retries at one slot (`MaskedModel.retry`'s ``share_reads``).
    """

    def __init__(self, engine, state, mask, start, heads=None, shared=None):
        super().__init__(engine, state, mask, start)
        self.live = engine.live_writers(mask).tolist()
        self.fresh = None if heads is None else {int(h) for h in heads}
        self.before = self.graph.slots[start].before  # rows computed before the restart slot
        self.first = self.before if start else 0  # rows whose part of later reads can be shared
        self.shared = shared

    def live_heads(self, l):
        first = self.graph.head_writers(l).start
        return [h for h in range(self.graph.n_heads) if self.live[first + h]]

    def heads(self, l):
        heads = self.live_heads(l)
        if self.fresh is not None and 2 * l == self.start:  # the other heads' rows are given
            heads = [h for h in heads if h in self.fresh]
        return None if len(heads) == self.graph.n_heads else heads

    def mlp_live(self, l):
        return self.live[self.graph.mlp_writer(l)]

    def push(self, index, out):  # index: a slice or a LongTensor of writer rows; out [n, B, S, d]
        flat = out.reshape(out.shape[0], -1)
        if isinstance(index, slice):  # contiguous rows: written in place, no temporaries
            if self.ytil is None:
                self.buf[index] = flat
            else:
                torch.sub(flat, self.ytil[index], out=self.buf[index])
            return
        if self.ytil is not None:
            flat = flat - self.ytil.index_select(0, index)
        self.buf.index_copy_(0, index, flat)

    def read(self, slot, readers, token_rows=None):
        m = self.mask[:self.graph.slots[slot].reads, readers]
        base, lo = self.shared_part(self.base(slot, token_rows).reshape(1, -1), m, slot, readers, token_rows)
        return self.mix(base, m[lo:], lo, m.shape[0], token_rows)

    def shared_part(self, base, m, slot, readers, token_rows):
        """(``base`` plus the read's part from the first ``first`` writers when the pass shares it,
        the first writer row left to read); ``base`` and 0 otherwise."""
        if self.shared is None or slot <= self.start or not self.first:
            return base, 0
        key = (slot, tuple(range(readers.start, readers.stop)) if isinstance(readers, slice)
               else tuple(readers.tolist()))
        if key not in self.shared:
            self.shared[key] = self.mix(base, m[:self.first], 0, self.first, token_rows)
        return self.shared[key], self.first

    def mix(self, base, m, lo, hi, token_rows, src=None, copies=1):
        """``base + m.T @ rows lo..hi of src`` (the stack by default), m: [hi - lo, R]; only writers
        with a non-zero coefficient contribute (all of them live, so finite rows). ``copies``: each
        row of ``src`` holds that many copies of the tokens (`_Copies`' own rows)."""
        src = self.buf if src is None else src
        used = (m != 0).any(1).nonzero().flatten()
        k = len(used)
        if token_rows is not None:  # a few token rows of the writers read: a small gather
            if copies > 1:
                token_rows = (torch.arange(copies, device=token_rows.device)[:, None] * (self.B * self.S)
                              + token_rows[None, :]).flatten()
            rows = src[lo:hi].view(hi - lo, copies * self.B * self.S, self.d)[used[:, None], token_rows[None, :]]
            src, m = rows.reshape(k, len(token_rows) * self.d), m[used]
        elif (2 if m.shape[1] >= 4 else 3) * k <= hi - lo:  # few rows read: gather them
            src, m = src.index_select(0, used + lo), m[used]
        else:  # every row: the others are read with coefficient 0 (finite: see the class docstring)
            src = src[lo:hi]
        if base is None:
            return m.t() @ src
        return torch.addmm(base, m.t(), src)


class _Copies(_Pruned):
    """K copies of a pruned retry whose masks differ in one reader's column (`MaskedModel.retry`'s
    ``column``). Rows of writers before the slot are read from the stack once for all copies; the
    rows of the live writers from the slot on are written to ``own`` ``[live writers after, K *
    B*S*d]`` (in writer order; copy k's part of a row at ``k*B*S*d``), so a later read is one
    product over the copies' rows plus the copies' shared part from the writers before the slot.
    Dead writers get no row (every coefficient that would read one is 0). The stack is only read."""

    def __init__(self, engine, state, mask, start, heads, shared, column):
        super().__init__(engine, state, mask, start, heads, shared)
        self.reader, self.values = column
        self.copies = K = self.values.shape[0]
        self.first = self.before
        if self.fresh is not None:  # each copy recomputes the heads its reader feeds
            hs = self.graph.head_writers(start // 2).start
            self.fresh.update(w - hs for w in self.graph.reader_nodes(self.reader))
        self.after = [w for w in range(self.before, self.graph.n_writers) if self.live[w]]  # the copies' own rows
        self.row_of = {w: i for i, w in enumerate(self.after)}
        self.after_t = torch.tensor(self.after, device=engine.device, dtype=torch.long)
        self.own = self.buf.new_empty(len(self.after), K * self.N)
        # the copies' attention sees every copy's batch rows
        am = state.attention_mask
        self.ctx = engine.adapter.context(self.S, None if am is None else am.repeat(K, 1), engine.device)

    def heads(self, l):
        heads = super().heads(l)
        if self.fresh is not None and 2 * l == self.start:  # the given rows, the same in every copy
            first, K, N = self.graph.head_writers(l).start, self.copies, self.N
            for h in self.live_heads(l):
                if h not in self.fresh:
                    self.own[self.row_of[first + h]].view(K, N).copy_(self.buf[first + h].expand(K, N))
        return heads

    def push(self, index, out):  # out [n, K*B, S, d]
        if isinstance(index, slice) and index.stop <= self.before:
            return super().push(index, out)  # the input row of a retry at slot 0: the stack's
        n, K, N = out.shape[0], self.copies, self.N  # a copy's rows: D = out - y~ per copy
        flat = out.reshape(n, -1)
        if isinstance(index, slice):  # live writers, consecutive in ``own`` too
            dest = self.own[self.row_of[index.start]:self.row_of[index.start] + n]
            if self.ytil is None:
                dest.copy_(flat)
            else:
                torch.sub(flat.view(n, K, N), self.ytil[index][:, None, :], out=dest.view(n, K, N))
            return
        if self.ytil is not None:
            flat = (flat.view(n, K, N) - self.ytil.index_select(0, index)[:, None, :]).view(n, K * N)
        at = torch.tensor([self.row_of[w] for w in index.tolist()], device=self.own.device)
        self.own.index_copy_(0, at, flat)

    def read(self, slot, readers, token_rows=None):
        n, K = self.graph.slots[slot].reads, self.copies
        base = self.base(slot, token_rows).reshape(1, -1)
        m = self.mask[:n, readers]
        if slot == self.start:  # the one read that differs between copies
            x = self.mix(base, m, 0, n, token_rows)  # [R, tokens*d], the same in every copy
            xs = x[:, None, :].expand(-1, K, -1)
            pos = (list(range(readers.start, readers.stop)) if isinstance(readers, slice) else readers.tolist())
            if self.reader in pos:
                xs = xs.clone()
                xs[pos.index(self.reader)] = self.mix(base, self.values[:, :n].t(), 0, n, token_rows)
            return xs.reshape(x.shape[0], -1)
        base, lo = self.shared_part(base, m, slot, readers, token_rows)
        if not lo:  # the copies' shared part, from the writers before the slot
            base = self.mix(base, m[:self.before], 0, self.before, token_rows)
        c = bisect.bisect_left(self.after, n)  # the live writers from the slot on read here
        mine = self.mix(None, m.index_select(0, self.after_t[:c]), 0, c, token_rows, self.own, K)
        R = mine.shape[0]
        return (mine.view(R, K, -1) + base.view(-1, 1, mine.shape[1] // K)).view(R, -1)
