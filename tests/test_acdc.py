"""ACDC: thresholds at the extremes, a planted circuit recovered exactly, restarted passes equal to
full ones, and the ranking it exposes."""
import math

import pytest
import torch

from circuitbench import MaskedModel, load_model
from circuitbench.method import circuits_at
from methods.acdc import ACDC, ranking
from methods_support import PLANTED_EDGES, SyntheticTask, make_examples, planted_gpt2


@pytest.fixture(scope="module")
def planted():
    model = planted_gpt2()
    return model, MaskedModel(model)


@pytest.fixture(scope="module", params=["random:gpt2-tiny", "random:llama-tiny"])
def tiny(request):
    model = load_model(request.param)
    return model, MaskedModel(model)


def _one(result):
    assert len(result.circuits) == 1
    return next(iter(result.circuits.values()))


def test_planted_circuit_is_recovered_exactly(planted):
    model, eng = planted
    res = ACDC(taus=(1e-4,)).discover(eng, SyntheticTask(), make_examples(16), None, [], progress=False)
    circuit = _one(res)
    assert sorted(circuit.edge_names) == PLANTED_EDGES
    # every planted edge was tried and raised the KL by more than tau when removed
    for name in PLANTED_EDGES:
        i, j = model.graph.parse_edge(name)
        assert circuit.scores[i, j] > 1e-4


def test_tau_zero_keeps_every_edge_that_matters(planted):
    model, eng = planted
    task, train = SyntheticTask(), make_examples(16)
    res = ACDC(taus=(0.0,)).discover(eng, task, train, None, [], progress=False)
    circuit = _one(res)
    assert set(PLANTED_EDGES) <= set(circuit.edge_names)
    assert res.info["taus"][0]["kl"] <= 1e-12  # nothing removed changed the output


def test_tau_infinite_removes_everything(tiny):
    model, eng = tiny
    res = ACDC(taus=(math.inf,)).discover(eng, SyntheticTask(), make_examples(8), None, [], progress=False)
    circuit = _one(res)
    assert circuit.n_edges == 0
    assert res.info["taus"][0]["trials"] < model.graph.n_edges  # disconnected readers were skipped


def test_tau_sweep_gives_nested_sizes_and_a_ranking(tiny):
    model, eng = tiny
    res = ACDC(taus=(1e-3, 1e-1)).discover(eng, SyntheticTask(), make_examples(8), None, [0.5], progress=False)
    sizes = [row["n_edges"] for row in res.info["taus"]]
    assert sizes[0] >= sizes[1]
    assert res.scores is not None and res.scores.shape == model.graph.valid.shape
    assert float(res.scores.max()) == 1.0 and float(res.scores.min()) == 0.0
    assert circuits_at(res, model.graph, [0.5])[0.5].n_edges == round(0.5 * model.graph.n_edges)
    assert res.cost.forward_passes > 0 and res.cost.wall_s["search"] > 0


def test_ranking_orders_tried_edges_by_increase():
    inc = torch.tensor([[0.3, float("nan")], [-0.2, 0.1]])
    r = ranking(inc)
    assert r[0, 1] == 0.0
    assert r[1, 0] < r[1, 1] < r[0, 0] == 1.0


def test_uncached_batches_give_the_same_circuit(tiny):
    model, eng = tiny
    task, train = SyntheticTask(), make_examples(8)
    a = _one(ACDC(taus=(1e-2,), batch_size=4).discover(eng, task, train, None, [], progress=False))
    b = _one(ACDC(taus=(1e-2,), batch_size=4, cache_mib=0).discover(eng, task, train, None, [], progress=False))
    assert torch.equal(a.edges, b.edges)


def test_reader_order_and_nodes_cover_the_graph(tiny):
    model, _ = tiny
    g = model.graph
    order = g.reader_order()
    assert sorted(r for r, _ in order) == list(range(g.n_readers))
    assert order[0][0] == g.logits_reader and order[1][0] == g.mlp_reader(g.n_layers - 1)
    heads = set()
    for r, slot in order:
        nodes = g.reader_nodes(r)
        heads.update(nodes)
        for w in nodes:  # a reader's node is written after the reader is read
            assert not g.valid[w, r]
    assert heads == set(range(1, g.n_writers))


@pytest.mark.parametrize("ablation", ["interchange", "zero"])
def test_restarted_pass_equals_full_pass(tiny, ablation):
    """The engine extension ACDC relies on: a pass restarted at any read slot from a writer stack
    whose prefix is intact gives the same logits as a full masked pass."""
    model, eng = tiny
    g = model.graph
    gen = torch.Generator().manual_seed(0)
    B, S = 3, 7
    clean = torch.randint(0, 1000, (B, S), generator=gen)
    corrupted = torch.randint(0, 1000, (B, S), generator=gen)
    pos = torch.full((B,), S - 1)
    cache = eng.corrupted_cache(corrupted, ablation=ablation)
    mask = (torch.rand(g.n_writers, g.n_readers, generator=gen) > 0.3).float()
    for slot in range(2 * g.n_layers + 1):
        first = (g.logits_reader if slot == 2 * g.n_layers
                 else g.attn_readers(slot // 2).start if slot % 2 == 0 else g.mlp_reader(slot // 2))
        m = torch.ones_like(mask)
        m[:, first:] = mask[:, first:]
        state = eng.begin(clean, positions=pos, corrupted=cache)  # the full model's stack
        want = eng(clean, edge_mask=m, positions=pos, corrupted=cache)
        got = eng.retry(state, m, slot=slot)
        # the full model's pass sums its reads in another order (uniform masks): equal up to rounding
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_restarted_pass_gradients_match(tiny):
    model, eng = tiny
    g = model.graph
    gen = torch.Generator().manual_seed(1)
    B, S = 2, 5
    clean = torch.randint(0, 1000, (B, S), generator=gen)
    cache = eng.corrupted_cache(torch.randint(0, 1000, (B, S), generator=gen))
    state = eng.begin(clean, corrupted=cache)  # as ACDC fills it (without autograd)
    first = g.attn_readers(1).start
    late = torch.full((g.n_writers, g.n_readers - first), 0.7, requires_grad=True)
    grads = []
    for restart in (False, True):
        m = torch.cat([torch.ones(g.n_writers, first), late], 1)
        logits = eng.retry(state, m, slot=2) if restart else eng(clean, edge_mask=m, corrupted=cache)
        logits.sum().backward()
        grads.append(late.grad.clone())
        late.grad = None
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_bad_taus_are_user_errors(tiny):
    from circuitbench.errors import UserError

    _, eng = tiny
    with pytest.raises(UserError):
        ACDC(taus=()).discover(eng, SyntheticTask(), make_examples(4), None, [], progress=False)
    with pytest.raises(UserError):
        ACDC(taus=(-1.0,)).discover(eng, SyntheticTask(), make_examples(4), None, [], progress=False)


def test_restart_with_fresh_heads_equals_full_pass(tiny):
    """A retry at an attention slot that recomputes only the heads whose readers changed (the
    other heads' rows come from the stack), and shares later reads' parts from the writers before
    the slot across the passes at that slot (``share_reads``), gives the logits of a full masked pass."""
    model, eng = tiny
    g = model.graph
    gen = torch.Generator().manual_seed(2)
    B, S = 3, 6
    clean = torch.randint(0, 1000, (B, S), generator=gen)
    pos = torch.full((B,), S - 1)
    cache = eng.corrupted_cache(torch.randint(0, 1000, (B, S), generator=gen))
    H, G = g.n_heads, g.kv_heads
    with torch.no_grad():
        for l in range(g.n_layers):
            ar = g.attn_readers(l)
            m = torch.ones(g.n_writers, g.n_readers)
            m[:, ar.start:] = (torch.rand(g.n_writers, g.n_readers - ar.start, generator=gen) > 0.3).float()
            m[:, g.logits_reader] = 1.0  # every head of the layer stays live
            m[:, [ar.start + H - 1, ar.start + H + G - 1]] = 1.0  # the trials below change something
            state = eng.begin(clean, positions=pos, corrupted=cache)  # the full model's rows
            eng.retry(state, m)  # the current circuit's
            for reader in (ar.start + H - 1, ar.start + H + G - 1):  # a query reader, a key reader
                trial = m.clone()
                trial[: g.writers_before_attn(l), reader] = 0.0
                heads = [w - g.head_writers(l).start for w in g.reader_nodes(reader)]
                want = eng(clean, edge_mask=trial, positions=pos, corrupted=cache)
                got = eng.retry(state, trial, slot=2 * l, heads=heads, share_reads=True)
                assert torch.allclose(got, want, atol=1e-5), (l, reader)
                assert not torch.allclose(got, eng(clean, edge_mask=m, positions=pos, corrupted=cache), atol=1e-6)
                eng.retry(state, m, slot=2 * l, heads=heads,
                          share_reads=True)  # the trial is rejected: its heads get the circuit's rows back
            assert l == 0 or state.shared  # later reads stored their part from writers before the slot


def test_fresh_heads_only_in_restarts_without_autograd(tiny):
    model, eng = tiny
    clean = torch.randint(0, 1000, (2, 4))
    cache = eng.corrupted_cache(torch.randint(0, 1000, (2, 4)))
    state = eng.begin(clean, corrupted=cache)
    with pytest.raises(ValueError, match="heads"):
        eng.retry(state, slot=1, heads=[0])
    with pytest.raises(ValueError, match="heads"):
        eng.retry(state, slot=2, heads=[0])  # autograd on


def test_search_with_head_subsets_equals_search_without(tiny):
    """ACDC's trials recompute only the changed heads of their layer; the search is unchanged."""
    from circuitbench.batches import BatchPlan
    from methods.acdc import run_acdc

    from circuitbench.method import CostMeter

    model, eng = tiny
    task, train = SyntheticTask(), make_examples(12)
    runs = []
    for subsets in (True, False):
        plan = BatchPlan(eng, task, train, 6, CostMeter(eng.device), 1e9, stack=True)
        runs.append(run_acdc(eng, task, plan, 3e-3, CostMeter(eng.device), progress=False, head_subsets=subsets))
    (e1, i1, kl1, n1), (e2, i2, kl2, n2) = runs
    assert torch.equal(e1, e2) and n1 == n2
    assert 0 < int(e1.sum()) < int(model.graph.valid.sum())  # some edges removed, some kept
    assert torch.allclose(i1, i2, atol=1e-6, equal_nan=True) and kl1 == pytest.approx(kl2, abs=1e-6)
