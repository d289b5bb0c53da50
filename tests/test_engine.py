"""The masked forward engine against the models' own forward passes.

- all masks 1 = the Hugging Face model's logits; all masks 0 = the corrupted run's logits;
- removing one edge = a hand-written activation patch of that one edge, done here with plain
  forward hooks on the Hugging Face modules, for q, k, v, MLP and logits readers, both ablations
  (the hooks patch a reader's own input: under GPT-NeoX's parallel residual the MLP's input is the
  layer's input, so the patch is the parallel block's without the engine's rule being assumed);
- gradients with respect to both masks match finite differences.
"""
import pytest
import torch

from circuitbench import MaskedModel, load_model

SPECS = ["random:gpt2-tiny", "random:llama-tiny", "random:qwen2-tiny", "random:neox-tiny",
         "random:gemma2-tiny", "random:gemma3-tiny"]


@pytest.fixture(scope="module", params=SPECS)
def model(request):
    return load_model(request.param)


def _batch(seed=0, B=3, S=7, vocab=1000):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, S), generator=g), torch.randint(0, vocab, (B, S), generator=g)


def test_all_ones_reproduce_model(model):
    clean, corrupted = _batch()
    mm = MaskedModel(model)
    want = model.hf_model(clean).logits
    got = mm(clean, corrupted)
    assert (got - want).abs().max().item() <= 1e-4
    assert (mm.reference(clean) - want).abs().max().item() <= 1e-4


def test_all_zeros_reproduce_corrupted_run(model):
    clean, corrupted = _batch()
    g = model.graph
    got = MaskedModel(model)(clean, corrupted, edge_mask=torch.zeros(g.n_writers, g.n_readers))
    assert (got - model.hf_model(corrupted).logits).abs().max().item() <= 1e-4


def test_node_mask_zero_everywhere_is_corrupted_run(model):
    clean, corrupted = _batch(1)
    got = MaskedModel(model)(clean, corrupted, node_mask=torch.zeros(model.graph.n_writers))
    assert (got - model.hf_model(corrupted).logits).abs().max().item() <= 1e-4


def test_positions_and_cache(model):
    clean, corrupted = _batch(2)
    mm = MaskedModel(model)
    full = model.hf_model(clean).logits
    pos = torch.tensor([[6, 0], [3, 5], [2, 2]])
    cache = mm.corrupted_cache(corrupted)
    got = mm(clean, positions=pos, corrupted=cache)
    assert got.shape == (3, 2, full.shape[-1])
    want = full[torch.arange(3)[:, None], pos]
    assert (got - want).abs().max().item() <= 1e-4


def test_padding_does_not_change_real_positions(model):
    """Right padding to the batch's longest example leaves every real position unchanged."""
    clean, corrupted = _batch(3, B=2, S=6)
    mm = MaskedModel(model)
    alone = mm(clean[:1, :4], corrupted[:1, :4])
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    padded = mm(clean, corrupted, attention_mask=mask)
    assert (padded[:1, :4] - alone).abs().max().item() <= 1e-4


# ---- hand-written activation patching with forward hooks ---------------------------------------

class _Patcher:
    """Activation patching of one edge writer -> reader on the Hugging Face model with hooks.

    delta = (writer's clean output) - (writer's ablated output); the patched reader reads
    (its clean input - delta); everything downstream recomputes from there.
    """

    def __init__(self, model):
        self.model, self.hf = model, model.hf_model
        self.family = model.family

    def _blocks(self):
        if self.family == "neox":
            return self.hf.gpt_neox.layers
        return self.hf.transformer.h if self.family == "gpt2" else self.hf.model.layers

    def writer_outputs(self, ids):
        """Every writer's output in a plain run: input embedding, per-head outputs, MLP outputs."""
        outs, hooks = {}, []
        H = self.model.graph.n_heads
        for l, blk in enumerate(self._blocks()):
            if self.family == "gpt2":
                o_proj, mlp = blk.attn.c_proj, blk.mlp

                def per_head(z, W=o_proj.weight):  # Conv1D: z @ W, W [in, out]
                    dh = z.shape[-1] // H
                    return [z[..., h * dh:(h + 1) * dh] @ W[h * dh:(h + 1) * dh] for h in range(H)]
            else:
                o_proj = blk.attention.dense if self.family == "neox" else blk.self_attn.o_proj
                mlp = blk.mlp

                def per_head(z, W=o_proj.weight):  # Linear: z @ W.T, W [out, in]
                    dh = z.shape[-1] // H
                    return [z[..., h * dh:(h + 1) * dh] @ W[:, h * dh:(h + 1) * dh].T for h in range(H)]

            def pre(mod, args, l=l, f=per_head):
                for h, y in enumerate(f(args[0])):
                    outs[f"a{l}.h{h}"] = y.detach()
            hooks.append(o_proj.register_forward_pre_hook(pre))
            hooks.append(mlp.register_forward_hook(lambda mod, a, out, l=l: outs.__setitem__(f"m{l}", out.detach())))
            if self.family.startswith("gemma"):
                hooks += _gemma_post_norms(blk, l, H, outs)
        try:
            with torch.no_grad():
                if self.family == "gpt2":
                    tr = self.hf.transformer
                    outs["input"] = (tr.wte(ids) + tr.wpe(torch.arange(ids.shape[1], device=ids.device))[None]).detach()
                elif self.family == "neox":
                    outs["input"] = self.hf.gpt_neox.embed_in(ids).detach()
                else:
                    outs["input"] = self.hf.model.embed_tokens(ids).detach()
                self.hf(ids)
        finally:
            for h in hooks:
                h.remove()
        return outs

    def patched_logits(self, ids, reader, delta):
        """Logits of a run where only ``reader`` reads (its input - delta)."""
        hooks = []
        kind = reader[reader.index("<") + 1:-1] if "<" in reader else None
        try:
            if reader == "logits":
                if self.family == "neox":
                    norm = self.hf.gpt_neox.final_layer_norm
                else:
                    norm = self.hf.transformer.ln_f if self.family == "gpt2" else self.hf.model.norm
                hooks.append(norm.register_forward_pre_hook(lambda m, a: (a[0] - delta,) + a[1:]))
            elif kind is None:  # MLP reader m{l}
                l = int(reader[1:])
                blk = self._blocks()[l]
                norm = blk.ln_2 if self.family == "gpt2" else blk.post_attention_layernorm
                if self.family.startswith("gemma"):  # Gemma's MLP reads through its pre-feedforward norm
                    norm = blk.pre_feedforward_layernorm
                hooks.append(norm.register_forward_pre_hook(lambda m, a: (a[0] - delta,) + a[1:]))
            else:
                layer, unit = reader.split("<")[0].split(".")
                l, idx = int(layer[1:]), int(unit[1:])
                blk = self._blocks()[l]
                g = self.model.graph
                dh = self.model.adapter.head_dim
                resid = {}
                if self.family == "gpt2":
                    blk_norm, proj = blk.ln_1, blk.attn.c_attn
                    offset = {"q": 0, "k": 1, "v": 2}[kind] * g.n_heads * dh
                    project = lambda x: x @ proj.weight + proj.bias  # Conv1D
                elif self.family == "neox":  # query_key_value viewed [..., heads, 3 * dh]: q, k, v per head
                    blk_norm, proj = blk.input_layernorm, blk.attention.query_key_value
                    offset = (2 * idx + {"q": 0, "k": 1, "v": 2}[kind]) * dh  # columns from (3 * idx + kind) * dh
                    project = lambda x: torch.nn.functional.linear(x, proj.weight, proj.bias)
                else:
                    blk_norm = blk.input_layernorm
                    proj = {"q": blk.self_attn.q_proj, "k": blk.self_attn.k_proj, "v": blk.self_attn.v_proj}[kind]
                    offset = 0
                    project = lambda x: torch.nn.functional.linear(x, proj.weight, proj.bias)
                cols = slice(offset + idx * dh, offset + (idx + 1) * dh)
                hooks.append(blk_norm.register_forward_pre_hook(lambda m, a: resid.__setitem__("x", a[0])))

                def replace(mod, args, out):
                    out = out.clone()
                    out[..., cols] = project(blk_norm(resid["x"] - delta))[..., cols]
                    return out
                hooks.append(proj.register_forward_hook(replace))
            with torch.no_grad():
                return self.hf(ids).logits
        finally:
            for h in hooks:
                h.remove()


def _gemma_post_norms(blk, l, H, outs):
    """Hooks that turn the patcher's Gemma writer outputs into the adapter's decomposition.

    Gemma's ``post_attention_layernorm`` acts on the sum of a layer's heads, so a head's output
    alone is not a term of the residual. The adapter (circuitbench/adapters/gemma.py) defines head
    h's writer output as its o_proj term times ``(1 + w) / rms(sum)``, the scale of that run's own
    sum, so that the heads add up to the norm's output. The reference takes both parts from the
    Hugging Face run: the o_proj terms from o_proj's input (the pre-hook above) and the scale from
    the norm's own input (the model's attention output); removing edge ``a0.h2 -> r`` then
    subtracts (clean share - corrupted share) from r's input. A patched q/k/v reader needs no such
    rule: the hooks change that head's projection, and the model's own norm renormalises the new
    sum, so the other heads' shares move through the scale as they do in the engine. The MLP's
    output is taken after ``post_feedforward_layernorm``.
    """
    def rescale(mod, args):
        x = args[0].float()
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.eps) * (1.0 + mod.weight.float())
        for h in range(H):
            y = outs[f"a{l}.h{h}"]
            outs[f"a{l}.h{h}"] = (y.float() * scale).to(y.dtype)

    def mlp_out(mod, args, out):
        outs[f"m{l}"] = out.detach()
    return [blk.post_attention_layernorm.register_forward_pre_hook(rescale),
            blk.post_feedforward_layernorm.register_forward_hook(mlp_out)]


def _readers_to_test(g):
    kv = "g" if g.grouped else "h"
    last = g.n_layers - 1
    return [f"a{last}.h1<q>", f"a{last}.{kv}1<k>", f"a{last}.{kv}0<v>", f"m{last}", "logits"]


@pytest.mark.parametrize("ablation", ["interchange", "zero"])
def test_one_edge_removed_equals_activation_patch(model, ablation):
    g = model.graph
    clean, corrupted = _batch(4)
    mm = MaskedModel(model)
    patcher = _Patcher(model)
    clean_out = patcher.writer_outputs(clean)
    corr_out = patcher.writer_outputs(corrupted)
    for reader in _readers_to_test(g):
        for writer in ["input", "a0.h2", "m0"]:
            w, r = g.parse_edge(f"{writer}->{reader}")
            delta = clean_out[writer] - (corr_out[writer] if ablation == "interchange" else 0)
            want = patcher.patched_logits(clean, reader, delta)
            mask = g.full_mask()
            mask[w, r] = 0
            got = mm(clean, corrupted, edge_mask=mask, ablation=ablation)
            # the patch must matter, or the comparison proves nothing
            assert (want - model.hf_model(clean).logits).abs().max() > 1e-3, (writer, reader)
            assert (got - want).abs().max().item() <= 1e-4, (writer, reader, ablation)


def test_zero_ablation_all_masks_zero_is_bias_only(model):
    """Under zero ablation with every mask 0 each reader sees only the constant output biases."""
    g = model.graph
    clean, _ = _batch(5)
    got = MaskedModel(model)(clean, edge_mask=torch.zeros(g.n_writers, g.n_readers), ablation="zero")
    hf = model.hf_model
    if model.family == "gpt2":
        bias = sum(blk.attn.c_proj.bias for blk in hf.transformer.h)
        want = hf.lm_head(hf.transformer.ln_f(bias))
    elif model.family == "neox":
        bias = sum(lay.attention.dense.bias for lay in hf.gpt_neox.layers)
        want = hf.lm_head(hf.gpt_neox.final_layer_norm(bias))
    else:  # no output biases: the final norm sees zeros
        want = hf.lm_head(hf.model.norm(torch.zeros(hf.config.hidden_size)))
    cap = getattr(hf.config, "final_logit_softcapping", None)
    if cap:  # Gemma 2 soft-caps its logits
        want = torch.tanh(want / cap) * cap
    assert (got - want).abs().max().item() <= 1e-4


# ---- gradients ----------------------------------------------------------------------------------

def _norms_in_input_dtype(model, monkeypatch):
    """transformers' RMSNorms compute in float32 even on float64 inputs, which would drown central
    differences in float32 rounding; for the gradient check they compute in the input dtype."""
    for mod in model.hf_model.modules():
        if type(mod).__name__.endswith("RMSNorm"):
            def forward(x, mod=mod):
                if type(mod).__name__.startswith("Gemma"):  # Gemma scales by 1 + w
                    return (1 + mod.weight) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.eps))
                return mod.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon))
            monkeypatch.setattr(mod, "forward", forward)


@pytest.mark.parametrize("spec", SPECS)
def test_mask_gradients_match_finite_differences(spec, monkeypatch):
    model = load_model(spec, dtype="float64")
    _norms_in_input_dtype(model, monkeypatch)
    g = model.graph
    clean, corrupted = _batch(6, B=2, S=5)
    mm = MaskedModel(model)
    cache = mm.corrupted_cache(corrupted)
    gen = torch.Generator().manual_seed(0)
    edge0 = torch.rand(g.n_writers, g.n_readers, generator=gen, dtype=torch.float64)
    node0 = torch.rand(g.n_writers, generator=gen, dtype=torch.float64)
    pos = torch.tensor([4, 2])

    def loss(edge, node):
        return mm(clean, edge_mask=edge, node_mask=node, positions=pos, corrupted=cache).log_softmax(-1)[..., :50].sum()

    edge = edge0.clone().requires_grad_(True)
    node = node0.clone().requires_grad_(True)
    loss(edge, node).backward()
    assert torch.isfinite(edge.grad).all() and torch.isfinite(node.grad).all()
    assert (edge.grad[~g.valid] == 0).all()
    eps = 1e-6
    valid = g.edge_index
    picks = valid[torch.randperm(len(valid), generator=gen)[:25]].tolist()
    for i, j in picks:
        up, down = edge0.clone(), edge0.clone()
        up[i, j] += eps
        down[i, j] -= eps
        fd = (loss(up, node0) - loss(down, node0)) / (2 * eps)
        assert abs(fd.item() - edge.grad[i, j].item()) <= 1e-5 * max(1.0, abs(fd.item())), (i, j)
    for i in range(g.n_writers):
        up, down = node0.clone(), node0.clone()
        up[i] += eps
        down[i] -= eps
        fd = (loss(edge0, up) - loss(edge0, down)) / (2 * eps)
        assert abs(fd.item() - node.grad[i].item()) <= 1e-5 * max(1.0, abs(fd.item())), i


def test_gradients_flow_under_llama_and_zero_ablation():
    model = load_model("random:llama-tiny")
    g = model.graph
    clean, _ = _batch(7)
    edge = torch.full((g.n_writers, g.n_readers), 0.5, requires_grad=True)
    out = MaskedModel(model)(clean, edge_mask=edge, positions=torch.tensor([6, 6, 6]), ablation="zero")
    out.logsumexp(-1).sum().backward()
    assert torch.isfinite(edge.grad).all() and edge.grad[g.valid].abs().sum() > 0


def test_bad_masks_and_ablation_are_user_errors(model):
    from circuitbench import UserError
    clean, corrupted = _batch()
    mm = MaskedModel(model)
    with pytest.raises(UserError, match="edge_mask"):
        mm(clean, corrupted, edge_mask=torch.ones(2, 2))
    with pytest.raises(UserError, match="ablation"):
        mm(clean, corrupted, ablation="mean-ish")
    with pytest.raises(UserError, match="corrupted"):
        mm(clean)


# ---- large-model options: gradient checkpointing and bf16 ------------------------------------------

def _mask_grads(model, checkpoint, dtype=torch.float32):
    g = model.graph
    clean, corrupted = _batch(8, B=4, S=9)
    mm = MaskedModel(model, checkpoint=checkpoint)
    gen = torch.Generator().manual_seed(1)
    edge = torch.rand(g.n_writers, g.n_readers, generator=gen).requires_grad_(True)
    node = torch.rand(g.n_writers, generator=gen).requires_grad_(True)
    ref = mm.reference(clean, positions=torch.full((4,), 8)).float().log_softmax(-1)
    out = mm(clean, corrupted, edge_mask=edge, node_mask=node, positions=torch.full((4,), 8))
    loss = torch.nn.functional.kl_div(out.float().log_softmax(-1), ref, log_target=True, reduction="batchmean")
    loss.backward()
    return edge.grad[g.valid], node.grad


def test_gradient_checkpointing_gives_the_same_mask_gradients(model):
    e0, n0 = _mask_grads(model, checkpoint=False)
    e1, n1 = _mask_grads(model, checkpoint=True)
    # the same arithmetic, recomputed: equal up to float32 rounding
    assert torch.allclose(e0, e1, rtol=1e-5, atol=1e-7) and torch.allclose(n0, n1, rtol=1e-5, atol=1e-7)


BF16_TOLERANCE = 0.05  # relative L2 error of the mask gradients, bf16 weights and activations vs float32


def test_bf16_mask_gradients_within_tolerance(model):
    e0, n0 = _mask_grads(model, checkpoint=False)
    low = load_model(model.spec, dtype="bfloat16")
    e1, n1 = _mask_grads(low, checkpoint=True)
    for a, b in ((e0, e1), (n0, n1)):
        rel = (a - b.float()).norm() / a.norm()
        assert rel <= BF16_TOLERANCE, rel.item()


@pytest.mark.parametrize("ablation", ["interchange", "zero"])
@pytest.mark.parametrize("value", [1.0, 0.4])
def test_uniform_masks_read_running_sums_exactly(model, ablation, value, monkeypatch):
    """One coefficient on every edge (the full model, eap-mask-ig's alpha * 1): reads are a running sum
    and the stack gradient one row (`_UniformRead`); logits and both mask gradients equal those of
    the general read (forced here by hiding the uniform value)."""
    clean, corrupted = _batch(5)
    mm, g = MaskedModel(model), model.graph
    pos = torch.tensor([6, 2, 5])
    assert mm._uniform_value(g.valid.float() * value) == pytest.approx(value)
    assert mm._uniform_value(torch.rand(g.n_writers, g.n_readers)) is None
    results = []
    for general in (False, True):
        if general:
            monkeypatch.setattr(mm, "_uniform_value", lambda mask: None)
        edge = torch.full((g.n_writers, g.n_readers), value, requires_grad=True)
        node = torch.ones(g.n_writers, requires_grad=True)
        logits = mm(clean, corrupted, edge_mask=edge, node_mask=node, positions=pos, ablation=ablation)
        (logits.log_softmax(-1)[..., 0].sum() + logits.pow(2).mean()).backward()
        results.append((logits.detach(), edge.grad[g.valid], node.grad))
    for fast, slow in zip(*results):
        assert torch.allclose(fast, slow, rtol=1e-4, atol=1e-5), (fast - slow).abs().max().item()
    assert results[0][1].abs().sum() > 0 and results[0][2].abs().sum() > 0


# ---- the pruned pass (no autograd: evaluation, ACDC's trials) -------------------------------------
def _sparse_mask(g, density, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(g.n_writers, g.n_readers, generator=gen) < density).float()


@pytest.mark.parametrize("ablation", ["interchange", "zero"])
@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_pruned_pass_equals_full_masked_pass(model, ablation, density):
    """Without autograd the engine skips writers no kept edge path leads from to the logits; the
    logits must equal those of the pass that computes every writer (the autograd path)."""
    clean, corrupted = _batch(3)
    mm, g = MaskedModel(model), model.graph
    pos = torch.tensor([6, 4, 5])
    for seed in range(3):
        mask = _sparse_mask(g, density, seed)
        with torch.enable_grad():
            want = mm(clean, corrupted, edge_mask=mask, positions=pos, ablation=ablation)
        with torch.no_grad():
            got = mm(clean, corrupted, edge_mask=mask, positions=pos, ablation=ablation)
        assert (got - want).abs().max().item() <= 1e-4
        if density < 1:
            assert not mm.live_writers(mm._effective_mask(mask, None)).all()


def test_pruned_pass_skips_dead_nodes(model, monkeypatch):
    """Only the embedding feeds the logits and one MLP: no attention runs and one MLP runs."""
    clean, corrupted = _batch(4)
    mm, g = MaskedModel(model), model.graph
    cache = mm.corrupted_cache(corrupted)  # the corrupted pass runs every node; made before counting
    calls = {"attention": [], "mlp": []}
    attention, mlp = model.adapter.attention, model.adapter.mlp
    monkeypatch.setattr(model.adapter, "attention",
                        lambda l, x, ctx, per_head=True, heads=None: calls["attention"].append(l) or
                        attention(l, x, ctx, per_head=per_head, heads=heads))
    monkeypatch.setattr(model.adapter, "mlp", lambda l, x: calls["mlp"].append(l) or mlp(l, x))
    mask = torch.zeros(g.n_writers, g.n_readers)
    mask[0, g.logits_reader] = 1
    mask[0, g.mlp_reader(0)] = 1
    mask[g.mlp_writer(0), g.logits_reader] = 1
    # a head whose only outgoing edge goes to a dead MLP: dead too
    mask[g.head_writers(0).start, g.mlp_reader(g.n_layers - 1)] = 1
    with torch.no_grad():
        got = mm(clean, corrupted=cache, edge_mask=mask)
    if model.adapter.head_subsets:
        assert calls == {"attention": [], "mlp": [0]}
    else:  # heads coupled within a layer (Gemma's post-attention norm): every node runs, no pruning
        every = list(range(g.n_layers))
        assert calls == {"attention": every, "mlp": every}
    live = mm.live_writers(mask)
    assert live.nonzero().flatten().tolist() == [0, g.mlp_writer(0)]
    with torch.enable_grad():
        want = mm(clean, corrupted, edge_mask=mask)
    assert (got - want).abs().max().item() <= 1e-4


def test_pruned_pass_computes_a_subset_of_heads(model):
    """Half the heads of each layer live (under GQA: part of a key/value group): equal logits."""
    clean, corrupted = _batch(5)
    mm, g = MaskedModel(model), model.graph
    mask = torch.ones(g.n_writers, g.n_readers)
    for l in range(g.n_layers):
        dead = list(range(g.head_writers(l).start, g.head_writers(l).stop))[1::2]
        mask[dead] = 0
    live = mm.live_writers(mask)
    assert 0 < int(live.sum()) < g.n_writers
    with torch.enable_grad():
        want = mm(clean, corrupted, edge_mask=mask)
    with torch.no_grad():
        got = mm(clean, corrupted, edge_mask=mask)
    assert (got - want).abs().max().item() <= 1e-4


def test_pruned_restart_equals_full_pass(model):
    """ACDC's use: fill the stack with the full model, then restart at a read slot with a mask
    that changes only readers at or after that slot."""
    clean, corrupted = _batch(6)
    mm, g = MaskedModel(model), model.graph
    cache = mm.corrupted_cache(corrupted)
    with torch.no_grad():
        state = mm.begin(clean, corrupted=cache)
        mask = torch.ones(g.n_writers, g.n_readers)
        last = g.n_layers - 1
        mask[:, g.attn_readers(last)] = _sparse_mask(g, 0.2, 7)[:, g.attn_readers(last)]
        mask[:, g.mlp_reader(last):] = _sparse_mask(g, 0.2, 8)[:, g.mlp_reader(last):]
        got = mm.retry(state, mask, slot=2 * last)
    want = mm(clean, corrupted=cache, edge_mask=mask)
    assert (got - want).abs().max().item() <= 1e-4


def test_begin_and_retry_equal_fresh_passes(model):
    """The incremental API: `begin` fills a batch's writer stack with the full model; each `retry`
    after one more edge removed, at that edge's read slot (readers visited last to first, as ACDC
    does), gives the logits of a fresh forward pass with that mask, without autograd and with (then
    with the forward's mask gradient too)."""
    clean, corrupted = _batch(8)
    mm, g = MaskedModel(model), model.graph
    pos = torch.tensor([6, 4, 5])
    cache = mm.corrupted_cache(corrupted)
    state = mm.begin(clean, corrupted=cache, positions=pos)
    assert state.shape == tuple(clean.shape) and state.corrupted is cache
    gen = torch.Generator().manual_seed(9)
    mask = g.full_mask()
    with torch.no_grad():
        assert (mm.retry(state, mask) - mm(clean, corrupted=cache, positions=pos)).abs().max().item() <= 1e-4
    for reader, slot in g.reader_order()[::5]:
        writer = int(torch.randint(0, int(g.valid[:, reader].sum()), (1,), generator=gen))
        mask[writer, reader] = 0
        with torch.no_grad():
            got = mm.retry(state, mask, slot=slot)
            want = mm(clean, corrupted=cache, edge_mask=mask, positions=pos)
        assert (got - want).abs().max().item() <= 1e-4, (reader, slot)
    # with autograd, from the same kind of stack: the logits and the mask gradient of `forward`
    assert mm.live_writers(mask).all()  # (a pruned stack's rows of dead writers are zeros, not y - y~)
    slot = 2 * (g.n_layers - 1)
    late = g.slots[slot].readers.start
    grads = []
    for restart in (False, True):
        edge = mask.clone().requires_grad_(True)
        if restart:
            logits = mm.retry(mm.begin(clean, corrupted=cache, edge_mask=mask, positions=pos), edge, slot=slot)
        else:
            logits = mm(clean, corrupted=cache, edge_mask=edge, positions=pos)
        logits.logsumexp(-1).sum().backward()
        grads.append(edge.grad[:, late:])
    assert torch.allclose(grads[0], grads[1], atol=1e-4)


def test_begin_takes_a_given_stack_and_retry_checks_its_arguments(model):
    clean, corrupted = _batch(9)
    mm, g = MaskedModel(model), model.graph
    cache = mm.corrupted_cache(corrupted)
    full = mm.begin(clean, corrupted=cache).stack
    given = full.clone()
    state = mm.begin(clean, corrupted=cache, stack=given)  # no pass: the state uses the stack in place
    assert state.stack is given and torch.equal(given, full)
    with pytest.raises(ValueError, match="stack"):
        mm.begin(clean, corrupted=cache, stack=given[:, :-1])
    with pytest.raises(ValueError, match="slot"):
        mm.retry(state, slot=g.n_slots)
    with torch.no_grad(), pytest.raises(ValueError, match="attention slot"):
        mm.retry(state, slot=1, heads=[0])


def test_retry_shared_reads_follow_the_later_edges(model):
    """``share_reads`` keeps later reads' parts from the writers before the slot; a retry whose
    edges from those writers into later readers differ does not use them."""
    clean, corrupted = _batch(10)
    mm, g = MaskedModel(model), model.graph
    pos = torch.tensor([6, 4, 5])
    cache = mm.corrupted_cache(corrupted)
    state = mm.begin(clean, corrupted=cache, positions=pos)
    if not model.adapter.head_subsets:  # no pruned kernels, so nothing to share: a clear error
        with torch.no_grad(), pytest.raises(ValueError, match="head_subsets"):
            mm.retry(state, g.full_mask(), slot=2, share_reads=True)
        return
    slot = 2  # layer 1's attention readers
    first = g.mlp_reader(1) + 1
    with torch.no_grad():
        m1 = g.full_mask()
        m1[0, g.attn_readers(1).start] = 0
        mm.retry(state, m1, slot=slot, share_reads=True)
        made = dict(state.shared)
        assert made
        m2 = m1.clone()
        m2[0, first:] = 0  # the input's edges into later readers
        for m, same in ((m1, True), (m2, False), (m1, False)):
            got = mm.retry(state, m, slot=slot, share_reads=True)
            want = mm(clean, corrupted=cache, edge_mask=m, positions=pos)
            assert (got - want).abs().max().item() <= 1e-4
            assert all(state.shared.get(key) is part for key, part in made.items()) == same
        mm.retry(state, m1, slot=1)  # a retry at another slot drops them
        assert not state.shared


def test_engine_benchmark_reports_every_ratio():
    from circuitbench.bench import engine_benchmark

    r = engine_benchmark("random:gpt2-tiny", batch=2, seq=5, threads=1, repeats=1, memory=False, progress=False)
    for key in ("masked_over_plain", "masked_over_plain_frozen", "masked_with_corrupted_over_plain",
                "eval_masked_over_plain", "eval_sparse_over_full"):
        assert r[key] > 0 and r[key] == r[key]  # measured, finite
