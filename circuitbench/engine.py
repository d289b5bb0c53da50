"""The masked forward engine: a transformer whose edges can each be replaced by corrupted (or zero)
activations, exactly and differentiably.

Per example pair (clean x, corrupted x~):

1. corrupted pass (no grad): every writer's output y~_w and the corrupted residual stream at every
   read point (`CorruptedCache`; reusable across steps);
2. masked pass: a writer stack D = [y_w - y~_w] of shape [writers, B*S*d]; reader r reads
   ``corrupted_residual + sum_w z[w, r] * D_w`` (eq. 3 of Bhaskar et al. 2024), one matrix product
   per layer. Node masks scale a writer's row of the edge mask.

All masks 1 reproduce the model; all masks 0 reproduce the corrupted run; zero ablation uses
y~ = 0. The attention output bias is a constant that rides along in the residual and is never
ablated.

The writer stack is one preallocated buffer written once per writer; `_ReadMix` reads a prefix of
it without copying, and its gradient is accumulated in place in one buffer (`_StackGrad`), so a
read point costs one GEMM forward and two backward, with no growing concatenations and no
per-read gradient tensors.

Without autograd (evaluation, ACDC's trials) the pass runs only the heads and MLPs that a chain of
kept edges connects to the logits (`MaskedModel.live_writers`): a sparse circuit costs a fraction
of the full pass, exactly. Passes restarted at a read slot (ACDC) can recompute only some heads of
that layer (``fresh_heads``) and share later reads' parts from the writers before the slot
(``prefix``).

When every edge has the same coefficient (the full model; EAP's and eap-mask-ig's masks), a read is a
running sum of the stack and each writer's gradient one row (`_UniformRead`).

Parallel blocks (``graph.parallel``: GPT-NeoX with ``use_parallel_residual``): the attention and
the MLP of layer l both read the writers before the layer (their read slots 2l and 2l+1 hold the
same corrupted residual) and the layer adds the heads, the output bias and the MLP's output to the
residual. The autograd pass reads all of a parallel layer's readers in one read point, so the
writers of the layer before hand their gradient on once.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

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


class MaskedModel(torch.nn.Module):
    """A loaded model whose edges and nodes can be masked.

    ``MaskedModel(model)(clean_ids, corrupted_ids, attention_mask=None, edge_mask=None,
    node_mask=None, positions=None, ablation="interchange", corrupted=None)`` -> logits
    ``[B, P, vocab]``. ``edge_mask`` is ``[writers, readers]`` (entries outside ``graph.valid`` are
    ignored), ``node_mask`` is ``[writers]``; None means all ones. ``positions`` is a LongTensor
    ``[B, P]`` or ``[B]`` of token indices to score, or None for all. Pass ``corrupted=`` a
    `CorruptedCache` from `corrupted_cache` to skip the corrupted pass.
    """

    def __init__(self, model, checkpoint: bool = False):
        super().__init__()
        self.model = model
        # recompute each layer's activations in the backward pass instead of keeping them (large
        # models); the writer stack itself is always kept
        self.checkpoint = checkpoint
        self.adapter = model.adapter
        self.graph = model.graph
        g = self.graph
        self._L, self._H = g.n_layers, g.n_heads

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
            slots = resid.new_empty(2 * self._L + 1, B, S, resid.shape[-1])
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
            slots[2 * self._L] = resid
            return writers.view(g.n_writers, -1), slots.view(2 * self._L + 1, -1)
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
            consts = torch.zeros(2 * self._L + 1, d, device=self.device, dtype=self.dtype)
            acc = torch.zeros(d, device=self.device, dtype=self.dtype)
            for l in range(self._L):
                consts[2 * l] = acc
                b = self._bias_const(l)
                if b is not None:
                    acc = acc + b
                # a parallel block's MLP reads the layer's input, without this layer's output bias
                consts[2 * l + 1] = consts[2 * l] if self.graph.parallel else acc
            consts[2 * self._L] = acc
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
                node_mask=None, positions=None, ablation="interchange", corrupted=None,
                start_slot=0, stack=None, fresh_heads=None, prefix=None, column=None):
        """The masked pass; see the class docstring.

        Restarting part-way (ACDC's trials): ``stack`` is a ``[writers, B*S*d]`` tensor used as the
        writer stack D. The pass reads the rows of the writers computed before read slot
        ``start_slot`` (the `CorruptedCache` slot numbering: 2l = layer l's attention readers, 2l+1
        = its MLP reader, 2L = the logits; before slot 2l+1 the heads of layer l are computed, also
        in a parallel block) as given, and overwrites every later row in place, so
        after the call ``stack`` holds this pass's writer stack; a later pass whose masks differ
        only in readers at or after some slot can restart there with the same ``stack``. Passing
        ``stack`` with ``start_slot=0`` computes everything and fills it.

        Without autograd (``torch.no_grad()``: evaluation, ACDC's trials) the pass computes only
        the writers that can reach the logits through kept edges (`live_writers`) when the adapter
        supports head subsets; their stack rows are the only ones written, so a restarted pass must
        not read a writer before ``start_slot`` that was dead in the pass that filled ``stack``
        (ACDC fills it with the full model, where every writer is live).

        ``fresh_heads`` (a restart at an attention slot 2l without autograd only; a sequence of
        head indices of layer l): compute only these heads of layer l and take the other heads'
        rows of ``stack`` as given. The caller vouches that those rows hold what this mask makes
        them (ACDC: a trial changes one reader's edges, so only the heads that reader feeds, and
        heads a rejected trial left with the trial's rows, need computing).

        ``prefix`` (restarts without autograd only; a dict the caller keeps): a series of passes
        that restart at the same slot from the same stack and differ only in the edges into readers
        of that slot (ACDC's trials at one slot) share each later read's contribution from the
        writers before the slot. The first pass of the series stores it in ``prefix``, [readers,
        tokens * d] per later read point, and the others read only the rows from the slot on. Start a
        new dict whenever the slot, the stack's earlier rows or a later reader's edges change.

        ``column=(reader, values)`` (restarts without autograd only, on an adapter with head
        subsets; ``values`` a ``[K, writers]`` tensor): K copies of the restarted pass in one,
        copy k's edge mask being ``edge_mask`` with ``reader``'s column replaced by ``values[k]``
        (ACDC's batched trials: K candidate removals into one reader). ``start_slot`` must be
        ``reader``'s read slot. Returns ``[K * B, P, vocab]``, copy k in rows ``k*B:(k+1)*B``. The
        copies share the stack's rows of the writers before the slot (read once, never copied) and
        every later read's part from them (``prefix`` works as for single passes, with the same
        keys); the copies' own rows, from the slot on, live in a scratch buffer of the call:
        ``stack`` is read, never written (at slot 0 its input row is rewritten, as by every pass
        from slot 0), so ``stack`` still holds what it held before. With ``fresh_heads`` (an
        attention slot), each copy computes those heads and the heads ``reader`` feeds (added when
        missing); the other live heads of the layer are taken from ``stack``, the same in every
        copy. Later reads use ``edge_mask`` in every copy. Raises ValueError with autograd on,
        without ``stack``, on an adapter without head subsets, or when ``start_slot`` is not the
        reader's slot (there is no fallback: the caller runs K single passes instead).
        """
        a, g = self.adapter, self.graph
        ids, attention_mask = self._prep(clean_ids, attention_mask)
        B, S = ids.shape
        if not 0 <= start_slot <= 2 * self._L:
            raise ValueError(f"start_slot must lie in [0, {2 * self._L}], got {start_slot}")
        if start_slot and stack is None:
            raise ValueError("a pass that starts after the embeddings needs the writer stack (stack=)")
        if fresh_heads is not None and (stack is None or start_slot % 2 or start_slot == 2 * self._L):
            raise ValueError("fresh_heads needs a restart at an attention slot (even start_slot < 2L) and stack=")
        if column is not None:
            column = self._check_column(column, start_slot, stack, node_mask)
        if corrupted is None:
            corrupted = self.corrupted_cache(corrupted_ids, attention_mask, ablation, shape=(B, S))
        elif corrupted.shape != (B, S):
            raise UserError(f"corrupted cache is for a batch of shape {corrupted.shape}, not {(B, S)}")
        mask = self._effective_mask(edge_mask, node_mask)
        rows, P = self._rows(positions, B, S)

        ctx = a.context(S, attention_mask, self.device)
        d = self.adapter.d_model
        N = B * S * d
        ytil = corrupted.writers  # None: zero ablation
        prune = not torch.is_grad_enabled() and getattr(a, "head_subsets", False)
        if stack is None:  # the writer stack D (zeros without autograd: rows of dead writers stay finite)
            buf = (torch.zeros if prune else torch.empty)(g.n_writers, N, device=self.device, dtype=self.dtype)
        elif tuple(stack.shape) != (g.n_writers, N) or stack.dtype != self.dtype:
            raise ValueError(f"stack must be {self.dtype} of shape {(g.n_writers, N)}, got "
                             f"{stack.dtype} {tuple(stack.shape)}")
        else:
            buf = stack

        if prune:  # evaluation and search passes: nodes no kept edge reads are never computed
            if column is not None:  # the copies' attention sees every copy's batch rows
                K = column[1].shape[0]
                ctx = a.context(S, None if attention_mask is None else attention_mask.repeat(K, 1), self.device)
            return self._pruned_pass(ids, ctx, mask, corrupted, buf, rows, P, start_slot, fresh_heads, prefix,
                                     column)
        if fresh_heads is not None or prefix is not None or column is not None:
            raise ValueError("fresh_heads, prefix and column need a pass without autograd on an adapter with "
                             "head_subsets")
        state = _StackGrad()
        recompute = self.checkpoint and torch.is_grad_enabled()
        # one coefficient on every edge (the full model, EAP): reads are one running sum
        c = None if recompute or start_slot else self._uniform_value(mask)
        running = None if c is None else torch.zeros(N, device=self.device, dtype=self.dtype)

        def push(start, out):  # out: [n, ...] writer outputs; the stack stores D = out - y~
            rows_ = slice(start, start + out.shape[0])
            flat = out.detach().reshape(out.shape[0], N)
            if ytil is None:
                buf[rows_] = flat
            else:
                torch.sub(flat, ytil[rows_], out=buf[rows_])
            if running is not None:
                running.add_(buf[rows_].sum(0))
            return out

        def read(n_writers, readers, slot, latest, rows=None):
            base = corrupted.resid_at(slot, rows, d)
            if c is not None:
                return _UniformRead.apply(mask[:n_writers, readers], base, buf, rows, d, state, latest, running, c)
            return _ReadMix.apply(mask[:n_writers, readers], base, buf, rows, d, state, latest)

        # `latest`: the writer output just before each read point (None: a given, constant prefix)
        latest = push(0, a.embed(ids).to(self.dtype)[None]) if start_slot == 0 else None
        def layer(l, latest, mask):
            if g.parallel and start_slot <= 2 * l:
                # attention and MLP read the same writers: one read point for all the layer's readers
                # (its MLP reader comes right after its attention readers), so the writers before it
                # get their finished gradient once
                ar, mr = g.attn_readers(l), g.mlp_reader(l)
                x = read(g.writers_before_attn(l), slice(ar.start, mr + 1), 2 * l, latest)
                xa, xm = x.split([mr - ar.start, 1])
                heads = push(g.head_writers(l).start, a.attention(l, xa.view(-1, B, S, d), ctx, per_head=True))
                m = push(g.mlp_writer(l), a.mlp(l, xm.view(B, S, d))[None])
                return torch.cat([heads, m])  # this layer's writers, the last rows the next read covers
            if start_slot <= 2 * l:
                x = read(g.writers_before_attn(l), g.attn_readers(l), 2 * l, latest).view(-1, B, S, d)
                latest = push(g.head_writers(l).start, a.attention(l, x, ctx, per_head=True))
            mr = g.mlp_reader(l)
            x = read(g.writers_before_mlp(l), slice(mr, mr + 1), 2 * l + 1, latest).view(B, S, d)
            return push(g.mlp_writer(l), a.mlp(l, x)[None])

        for l in range(start_slot // 2, self._L):
            if recompute:  # re-running a layer rewrites its own stack rows with the same values
                latest = torch.utils.checkpoint.checkpoint(layer, l, latest, mask, use_reentrant=False)
            else:
                latest = layer(l, latest, mask)
        lr = g.logits_reader
        final = read(g.n_writers, slice(lr, lr + 1), 2 * self._L, latest, rows)
        return a.unembed(final.view(B, P, d))

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

    def read_slot(self, reader: int) -> int:
        """The read slot of ``reader`` (`CorruptedCache` numbering: 2l = layer l's attention
        readers, 2l+1 = its MLP reader, 2L = the logits)."""
        g = self.graph
        if reader == g.logits_reader:
            return 2 * self._L
        layer, offset = divmod(reader, g.readers_per_layer)
        return 2 * layer + int(offset >= g.attn_readers_per_layer)

    def _fed_heads(self, reader: int) -> list[int]:
        """The heads (indices within their layer) whose input ``reader`` is: a query reader's head,
        every head of a key/value reader's group; none for an MLP reader or the logits."""
        g = self.graph
        if reader == g.logits_reader:
            return []
        offset = reader % g.readers_per_layer
        if offset < g.n_heads:
            return [offset]
        if offset < g.attn_readers_per_layer:
            group = (offset - g.n_heads) % g.kv_heads
            per = g.n_heads // g.kv_heads
            return list(range(group * per, (group + 1) * per))
        return []

    def _check_column(self, column, start_slot, stack, node_mask):
        """``forward``'s ``column`` validated: (reader, values [K, W] on the engine's device and dtype,
        node mask applied)."""
        g = self.graph
        try:
            reader, values = column
            reader = int(reader)
        except (TypeError, ValueError):
            raise ValueError("column must be a pair (reader, values [K, writers])") from None
        if torch.is_grad_enabled() or not getattr(self.adapter, "head_subsets", False):
            raise ValueError("column needs a pass without autograd (torch.no_grad()) on an adapter with head_subsets")
        if stack is None:
            raise ValueError("column needs a restart from a writer stack (stack=)")
        if not 0 <= reader < g.n_readers:
            raise ValueError(f"column's reader must lie in [0, {g.n_readers}), got {reader}")
        if self.read_slot(reader) != start_slot:
            raise ValueError(f"column's reader {reader} is read at slot {self.read_slot(reader)}, "
                             f"not at start_slot {start_slot}")
        values = torch.as_tensor(values)
        if values.dim() != 2 or values.shape[1] != g.n_writers or values.shape[0] < 1:
            raise ValueError(f"column's values must be [K >= 1, {g.n_writers}], got {tuple(values.shape)}")
        values = values.to(device=self.device, dtype=self.dtype)
        if node_mask is not None:
            values = values * node_mask.to(device=self.device, dtype=self.dtype)[None, :]
        return reader, values

    def _writers_before(self, slot: int) -> int:
        """How many writers are computed before read slot ``slot`` in the pass's order (a prefix): a
        restart there takes their rows as given. Before an MLP slot the layer's heads are computed,
        also in a parallel block, where the MLP does not read them (its reader reads fewer rows)."""
        g = self.graph
        if slot == 2 * self._L:
            return g.n_writers
        return g.writers_before_attn(slot // 2) if slot % 2 == 0 else g.head_writers(slot // 2).stop

    def _pruned_pass(self, ids, ctx, mask, corrupted, buf, rows, P, start_slot, fresh_heads=None, prefix=None,
                     column=None):
        """The masked pass without autograd, computing only live writers (`live_writers`): dead
        heads and MLPs and their readers are skipped; a read point gathers the rows of the writers
        with a non-zero coefficient when they are few, and otherwise reads the stack in place. Equal to the full
        masked pass up to float rounding. Stack rows of dead writers are left as
        they were: every coefficient that reads them is 0 (a kept edge into a live reader makes its
        writer live), so they must only be finite: a new stack starts at zero, and a given one was
        filled by an earlier pass. ``fresh_heads``, ``prefix``, ``column``: see `forward`.

        With ``column`` (K copies), rows of writers before the slot are read from ``buf`` once for
        all copies; the rows of the live writers from the slot on are written to ``own`` ``[live
        writers after, K * B*S*d]`` (in writer order; copy k's part of a row at ``k*B*S*d``), so a
        later read is one product over the copies' rows, ``[R, K * tokens * d]``, plus the copies'
        shared part from the writers before the slot. Dead writers get no row (every coefficient
        that would read one is 0).
        """
        a, g, d = self.adapter, self.graph, self.adapter.d_model
        B, S = ids.shape
        N = B * S * d
        ytil = corrupted.writers
        live_list = self.live_writers(mask).tolist()
        K = 1 if column is None else column[1].shape[0]
        before = self._writers_before(start_slot)  # rows the copies share (column passes)
        own = None
        if column is not None:
            reader_k, values_k = column
            after = [w for w in range(before, g.n_writers) if live_list[w]]  # the copies' own rows
            row_of = {w: i for i, w in enumerate(after)}
            after_t = torch.tensor(after, device=self.device, dtype=torch.long)
            own = buf.new_empty(len(after), K * N)

        def push(index, out):  # index: a slice or a LongTensor of writer rows; out [n, K*B, S, d]
            flat = out.reshape(out.shape[0], -1)
            if own is not None and not (isinstance(index, slice) and index.stop <= before):
                n = out.shape[0]  # a copy's rows: the copies' own buffer, D = out - y~ per copy
                if isinstance(index, slice):  # live writers, consecutive in ``own`` too
                    at = row_of[index.start]
                    dest = own[at:at + n]
                    if ytil is None:
                        dest.copy_(flat)
                    else:
                        torch.sub(flat.view(n, K, N), ytil[index][:, None, :], out=dest.view(n, K, N))
                    return
                if ytil is not None:
                    flat = (flat.view(n, K, N) - ytil.index_select(0, index)[:, None, :]).view(n, K * N)
                at = torch.tensor([row_of[w] for w in index.tolist()], device=self.device)
                own.index_copy_(0, at, flat)
                return
            if isinstance(index, slice):  # contiguous rows: written in place, no temporaries
                if ytil is None:
                    buf[index] = flat
                else:
                    torch.sub(flat, ytil[index], out=buf[index])
                return
            if ytil is not None:
                flat = flat - ytil.index_select(0, index)
            buf.index_copy_(0, index, flat)

        def mix(base, m, lo, hi, token_rows, src_buf=None, offset=0, copies=1):
            # base + m.T @ (rows lo..hi of src_buf, numbered from ``offset``), m: [hi - lo, R]; only
            # writers with a non-zero coefficient contribute (all of them live, so finite rows).
            # ``copies``: each row holds that many copies of the tokens (the column pass's own rows)
            src_buf = buf if src_buf is None else src_buf
            lo_, hi_ = lo - offset, hi - offset
            used = (m != 0).any(1).nonzero().flatten()
            k = len(used)
            if token_rows is not None:  # a few token rows of the writers read: a small gather
                if copies > 1:
                    token_rows = (torch.arange(copies, device=token_rows.device)[:, None] * (B * S)
                                  + token_rows[None, :]).flatten()
                src = src_buf[lo_:hi_].view(hi - lo, copies * B * S, d)[used[:, None], token_rows[None, :]]
                src, m = src.reshape(k, len(token_rows) * d), m[used]
            elif (2 if m.shape[1] >= 4 else 3) * k <= hi - lo:  # few rows read: gather them
                src, m = src_buf.index_select(0, used + lo_), m[used]
            else:  # every row: the others are read with coefficient 0 (finite: see the docstring)
                src = src_buf[lo_:hi_]
            if base is None:
                return m.t() @ src
            return torch.addmm(base, m.t(), src)

        # writers before the restart slot: their part of every later read is the same in every pass
        # of the caller's series (`forward`'s ``prefix``), so it is computed once
        first = 0 if not start_slot else before
        shared_first = first if column is None else before

        def read(n_writers, readers, slot, token_rows=None):
            base = corrupted.resid_at(slot, token_rows, d).reshape(1, -1)
            m = mask[:n_writers, readers]
            if column is not None and slot == start_slot:  # the one read that differs between copies
                x = mix(base, m, 0, n_writers, token_rows)  # [R, tokens*d], the same in every copy
                xs = x[:, None, :].expand(-1, K, -1)
                pos = (list(range(readers.start, readers.stop)) if isinstance(readers, slice)
                       else readers.tolist())
                if reader_k in pos:
                    xs = xs.clone()
                    xs[pos.index(reader_k)] = mix(base, values_k[:, :n_writers].t(), 0, n_writers, token_rows)
                return xs.reshape(x.shape[0], -1)
            lo = 0
            if prefix is not None and slot > start_slot and shared_first:
                key = (slot, tuple(range(readers.start, readers.stop)) if isinstance(readers, slice)
                       else tuple(readers.tolist()))
                if key not in prefix:
                    prefix[key] = mix(base, m[:shared_first], 0, shared_first, token_rows)
                base, lo = prefix[key], shared_first
            if column is None:
                return mix(base, m[lo:], lo, n_writers, token_rows)
            if not lo:  # the copies' shared part, from the writers before the slot
                base = mix(base, m[:before], 0, before, token_rows)
            c = bisect.bisect_left(after, n_writers)  # the live writers from the slot on read here
            mine = mix(None, m.index_select(0, after_t[:c]), 0, c, token_rows, own, 0, K)  # [R, K*tokens*d]
            R = mine.shape[0]
            return (mine.view(R, K, -1) + base.view(-1, 1, mine.shape[1] // K)).view(R, -1)

        dev = self.device
        if start_slot == 0:
            push(slice(0, 1), a.embed(ids).to(self.dtype)[None])
        H, G = g.n_heads, g.kv_heads
        for l in range(start_slot // 2, self._L):
            hs, ar = g.head_writers(l), g.attn_readers(l)
            live_heads = [h for h in range(H) if live_list[hs.start + h]]
            heads = live_heads
            if fresh_heads is not None and 2 * l == start_slot:  # the other heads' rows are given
                fresh = set(int(h) for h in fresh_heads)
                if column is not None:
                    fresh.update(self._fed_heads(reader_k))
                heads = [h for h in heads if h in fresh]
                if column is not None:  # the given rows, the same in every copy
                    for h in live_heads:
                        if h not in fresh:
                            own[row_of[hs.start + h]].view(K, N).copy_(buf[hs.start + h].expand(K, N))
            if start_slot <= 2 * l and heads:
                if len(heads) == H:
                    x = read(g.writers_before_attn(l), ar, 2 * l).view(-1, K * B, S, d)
                    out = a.attention(l, x, ctx, per_head=True)
                    index = hs
                else:
                    sub = torch.tensor(heads, device=dev)
                    groups, _ = a.kv_groups(sub)
                    readers = torch.cat([ar.start + sub, ar.start + H + groups, ar.start + H + G + groups])
                    x = read(g.writers_before_attn(l), readers, 2 * l).view(-1, K * B, S, d)
                    out = a.attention(l, x, ctx, per_head=True, heads=sub)
                    index = hs.start + sub
                push(index, out)
            mw = g.mlp_writer(l)
            if live_list[mw]:
                mr = g.mlp_reader(l)
                x = read(g.writers_before_mlp(l), slice(mr, mr + 1), 2 * l + 1).view(K * B, S, d)
                push(slice(mw, mw + 1), a.mlp(l, x)[None])
        lr = g.logits_reader
        final = read(g.n_writers, slice(lr, lr + 1), 2 * self._L, rows)
        return a.unembed(final.view(K * B, P, d))

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
