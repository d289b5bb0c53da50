"""GPT-NeoX (Pythia): the parallel-block edge graph counted by hand, the adapter of both residual
kinds against transformers, and parallel graphs kept through circuit files and the results store.

The engine's exactness on ``random:neox-tiny`` (parallel residual, partial rotary embeddings) is
tested with the other families in tests/test_engine.py; here ``random:neox-seq-tiny`` (sequential
residual) gets the same checks against the Hugging Face model.
"""
import json
import subprocess
import sys

import pytest
import torch

from circuitbench import Graph, MaskedModel, UserError, load_model
from circuitbench.circuit import Circuit
from test_engine import _batch, _Patcher, _readers_to_test


def _hand_count(L, H, parallel):
    """Edges of an L-layer, H-head model without grouped-query attention, walked writer by reader:
    the input feeds every reader; a head or MLP of layer l feeds the readers of later layers and
    the logits; in a sequential block a head also feeds its own layer's MLP, in a parallel one not."""
    writers = [("input", -1)]
    for l in range(L):
        writers += [("head", l)] * H + [("mlp", l)]
    readers = []
    for l in range(L):
        readers += [("q", l)] * H + [("k", l)] * H + [("v", l)] * H + [("mlp", l)]
    readers.append(("logits", L))
    edges = 0
    for w_kind, w_layer in writers:
        for r_kind, r_layer in readers:
            if w_layer < r_layer:
                edges += 1
            elif w_layer == r_layer and w_kind == "head" and r_kind == "mlp" and not parallel:
                edges += 1
    return edges


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "circuitbench", *args], capture_output=True, text=True)


# ---- the graph -----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,parallel", [("random:neox-tiny", True), ("random:neox-seq-tiny", False)])
def test_graph_command_counts_the_block_rule_by_hand(spec, parallel):
    out = _cli("graph", "--model", spec, "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["parallel"] is parallel
    assert d["edges"] == _hand_count(d["layers"], d["heads"], parallel)
    assert d["edges"] == (102 if parallel else 110)  # 2 layers x 4 heads: 8 head -> own-MLP edges fewer
    text = _cli("graph", "--model", spec)
    assert text.returncode == 0 and f"edges    {d['edges']}" in text.stdout and "(neox," in text.stdout


def test_sequential_counts_are_unchanged():
    assert _hand_count(12, 12, parallel=False) == 32491 == Graph(12, 12).n_edges
    assert Graph(12, 12, parallel=True).n_edges == _hand_count(12, 12, parallel=True) == 32491 - 12 * 12
    assert load_model("random:gpt2-tiny").graph.parallel is False
    assert load_model("random:llama-tiny").graph.parallel is False


@pytest.mark.parametrize("L,H", [(2, 4), (6, 8), (3, 1)])
def test_parallel_graph_edges_names_and_readers(L, H):
    g = Graph(L, H, parallel=True)
    assert g.n_edges == _hand_count(L, H, True) == int(g.valid.sum()) == len(g.edge_names)
    assert (g.n_writers, g.n_readers) == (Graph(L, H).n_writers, Graph(L, H).n_readers)
    for k, name in enumerate(g.edge_names):  # names from indices and back
        assert tuple(g.edge_index[k].tolist()) == g.parse_edge(name)
    for l in range(L):
        # an MLP reads exactly what its layer's attention reads: the writers before the layer
        assert g.writers_before_mlp(l) == g.writers_before_attn(l)
        assert torch.equal(g.valid[:, g.mlp_reader(l)], g.valid[:, g.attn_readers(l).start])
        assert not g.valid[g.head_writers(l), g.mlp_reader(l)].any()
    with pytest.raises(ValueError, match="parallel block"):
        g.parse_edge("a0.h0->m0")
    with pytest.raises(ValueError, match="backwards"):
        g.parse_edge("m0->m0")
    assert g != Graph(L, H)


def test_effective_edges_follow_the_parallel_rule():
    g = Graph(2, 2, parallel=True)
    # a0.h0 -> m1 -> logits acts; m0 -> a0 cannot exist; input -> m0 -> logits acts
    c = Circuit.from_names(g, ["input->a0.h0<v>", "a0.h0->m1", "m1->logits", "input->m0", "m0->logits",
                               "input->a1.h1<q>"])
    assert sorted(c.effective().edge_names) == sorted(["input->a0.h0<v>", "a0.h0->m1", "m1->logits",
                                                      "input->m0", "m0->logits"])


# ---- the adapter against transformers ----------------------------------------------------------------
@pytest.fixture(scope="module", params=["random:neox-tiny", "random:neox-seq-tiny"])
def neox(request):
    return load_model(request.param)


def test_config_is_pythias_layout(neox):
    cfg, a = neox.hf_model.config, neox.adapter
    assert cfg.model_type == "gpt_neox" and neox.family == "neox"
    assert neox.graph.parallel == cfg.use_parallel_residual == (neox.spec == "random:neox-tiny")
    cos, _, _ = a.context(5, None, torch.device("cpu"))
    assert a.head_dim == 16 and cos.shape[-1] == 4  # rotary on a quarter of each head
    for lay in neox.hf_model.gpt_neox.layers:  # every bias drawn, so each one is exercised
        for lin in (lay.attention.query_key_value, lay.attention.dense, lay.mlp.dense_h_to_4h,
                    lay.mlp.dense_4h_to_h, lay.input_layernorm, lay.post_attention_layernorm):
            assert lin.bias.abs().min() > 0


def test_all_ones_all_zeros_and_padding(neox):
    clean, corrupted = _batch()
    mm, g = MaskedModel(neox), neox.graph
    want = neox.hf_model(clean).logits
    assert (mm(clean, corrupted) - want).abs().max().item() <= 1e-4
    zeros = mm(clean, corrupted, edge_mask=torch.zeros(g.n_writers, g.n_readers))
    assert (zeros - neox.hf_model(corrupted).logits).abs().max().item() <= 1e-4
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:], mask[1, :2] = 0, 0  # right and left padding
    got = mm(clean, corrupted, attention_mask=mask)
    want = neox.hf_model(clean, attention_mask=mask).logits
    assert (got[mask.bool()] - want[mask.bool()]).abs().max().item() <= 1e-4


def test_the_other_residual_rule_would_be_wrong(neox):
    """Run the engine with the graph of the other block kind: the logits leave the model's, so the
    all-ones test above tells the two rules apart."""
    clean, corrupted = _batch(1)
    mm = MaskedModel(neox)
    g = neox.graph
    mm.graph = Graph(g.n_layers, g.n_heads, None, True, not g.parallel)
    assert (mm(clean, corrupted) - neox.hf_model(clean).logits).abs().max().item() > 1e-3


@pytest.mark.parametrize("ablation", ["interchange", "zero"])
def test_one_edge_removed_equals_activation_patch(neox, ablation):
    """test_engine.py's hook patch on each residual kind, into the last layer's readers and into
    layer 0's MLP (which under the parallel rule reads only the input)."""
    g = neox.graph
    clean, corrupted = _batch(4)
    mm, patcher = MaskedModel(neox), _Patcher(neox)
    clean_out, corr_out = patcher.writer_outputs(clean), patcher.writer_outputs(corrupted)
    full = neox.hf_model(clean).logits
    pairs = [(w, r) for r in _readers_to_test(g) for w in ["input", "a0.h2", "m0"]] + [("input", "m0")]
    if not g.parallel:
        pairs.append(("a0.h1", "m0"))
    for writer, reader in pairs:
        w, r = g.parse_edge(f"{writer}->{reader}")
        delta = clean_out[writer] - (corr_out[writer] if ablation == "interchange" else 0)
        want = patcher.patched_logits(clean, reader, delta)
        mask = g.full_mask()
        mask[w, r] = 0
        got = mm(clean, corrupted, edge_mask=mask, ablation=ablation)
        assert (want - full).abs().max() > 1e-3, (writer, reader)
        assert (got - want).abs().max().item() <= 1e-4, (writer, reader, ablation)


def test_pruned_restarts_at_every_slot(neox):
    """Without autograd, a pass restarted at any read slot from the full model's stack (ACDC) equals
    the full masked pass; at a parallel MLP slot the layer's heads are given rows, not read."""
    clean, corrupted = _batch(6)
    mm, g = MaskedModel(neox), neox.graph
    cache = mm.corrupted_cache(corrupted)
    gen = torch.Generator().manual_seed(3)
    for slot in range(2 * g.n_layers + 1):
        first = (g.attn_readers(slot // 2).start if slot % 2 == 0 else g.mlp_reader(slot // 2)) \
            if slot < 2 * g.n_layers else g.logits_reader
        mask = torch.ones(g.n_writers, g.n_readers)
        mask[:, first:] = (torch.rand(g.n_writers, g.n_readers - first, generator=gen) < 0.4).float()
        with torch.no_grad():
            state = mm.begin(clean, corrupted=cache)
            full = state.stack.clone()
            got = mm.retry(state, mask, slot=slot)
        want = mm(clean, corrupted=cache, edge_mask=mask)
        assert (got - want).abs().max().item() <= 1e-4, slot
        # the autograd pass restarts at the same slots
        edge = mask.clone().requires_grad_(True)
        again = mm.retry(mm.begin(clean, corrupted=cache, stack=full), edge, slot=slot)
        assert (again - want).abs().max().item() <= 1e-4, slot
        again.logsumexp(-1).sum().backward()
        assert torch.isfinite(edge.grad).all()


def test_a_local_folder_loads_as_neox(tmp_path, neox):
    neox.hf_model.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    assert again.family == "neox" and again.graph == neox.graph
    ids = torch.randint(0, 500, (2, 5))
    assert torch.allclose(MaskedModel(again).reference(ids), neox.hf_model(ids).logits, atol=1e-5)


# ---- parallel graphs through files and the store --------------------------------------------------------
def test_circuit_files_keep_the_block_kind(tmp_path):
    par, seq = Graph(2, 4, parallel=True), Graph(2, 4)
    gen = torch.Generator().manual_seed(0)
    c = Circuit.from_scores(par, torch.randn(par.n_writers, par.n_readers, generator=gen), 30)
    path = tmp_path / "c.json"
    c.save(path)
    assert json.loads(path.read_text())["graph"]["parallel"] is True
    assert Circuit.load(path, par).edge_names == c.edge_names
    with pytest.raises(UserError, match="graph"):
        Circuit.load(path, seq)
    Circuit.from_scores(seq, torch.randn(seq.n_writers, seq.n_readers, generator=gen), 30).save(path)
    assert "parallel" not in json.loads(path.read_text())["graph"]  # sequential files as before
    with pytest.raises(UserError, match="graph"):
        Circuit.load(path, par)
    c.save(path, format="eap")
    assert json.loads(path.read_text())["cfg"]["parallel_attn_mlp"] is True
    assert Circuit.load(path, par).edge_names == c.edge_names
    with pytest.raises(UserError, match="parallel_attn_mlp"):
        Circuit.load(path, seq)


def test_stored_runs_keep_the_parallel_graph(tmp_path):
    from circuitbench.runner import run_sweep
    from circuitbench.store import ResultsStore
    from circuitbench.sweep import Sweep

    sweep = Sweep.build(flags={"methods": ["random"], "tasks": "ioi-t1", "models": "random:neox-tiny",
                               "n_train": "8", "eval_limit": 8, "method_preset": "smoke", "sparsities": "0.9"})
    s = run_sweep(sweep, results=str(tmp_path), progress=False)
    assert s.failed_jobs == []
    store = ResultsStore(tmp_path)
    try:
        run = store.runs().iloc[0]
        assert run["total_edges"] == 102
        assert store.circuit(run["run_id"]).graph == load_model("random:neox-tiny").graph
    finally:
        store.close()
