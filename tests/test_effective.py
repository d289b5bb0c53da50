"""Effective edges: the kept edges on an input -> logits path, counted by hand on small graphs, shown
to carry the whole circuit's function through the engine, and used to cut rankings."""
import pytest
import torch

from circuitbench import MaskedModel, load_model
from circuitbench.circuit import Circuit
from circuitbench.graph import Graph


def _circuit(graph, names):
    return Circuit.from_names(graph, names)


def test_hand_built_circuit_with_known_dangling_edges():
    g = Graph(2, 2)
    acting = ["input->a0.h0<v>", "a0.h0->m0", "m0->logits"]
    dangling = [
        "a0.h1->logits",  # a0.h1 has no kept input: nothing of the clean run reaches it
        "input->a1.h1<q>",  # a1.h1 writes nowhere
        "input->a1.h0<k>", "a1.h0->m1",  # reaches m1, whose output is not kept anywhere
    ]
    c = _circuit(g, acting + dangling)
    assert c.n_edges == 7
    assert c.n_effective == 3
    assert sorted(c.effective().edge_names) == sorted(acting)
    assert c.effective().n_effective == 3  # dropping dangling edges keeps every acting one


def test_a_path_through_a_key_reader_reaches_the_heads_of_its_group():
    g = Graph(1, 4, 2)  # heads 0, 1 share key/value group 0; heads 2, 3 group 1
    c = _circuit(g, ["input->a0.g0<k>", "a0.h1->logits", "a0.h2->logits"])
    assert sorted(c.effective().edge_names) == ["a0.h1->logits", "input->a0.g0<k>"]
    # the reverse direction: a kept value reader of a group whose heads reach nothing is dangling
    c = _circuit(g, ["input->a0.g1<v>", "a0.h1->logits", "input->a0.h1<q>"])
    assert sorted(c.effective().edge_names) == ["a0.h1->logits", "input->a0.h1<q>"]


def test_full_and_empty():
    g = Graph(3, 4, 2)
    assert Circuit.full(g).n_effective == g.n_edges
    assert Circuit.empty(g).n_effective == 0
    assert _circuit(g, ["input->logits"]).n_effective == 1


@pytest.mark.parametrize("spec", ["random:gpt2-tiny", "random:llama-tiny", "random:neox-tiny"])
def test_dangling_edges_change_nothing_in_the_engine(spec):
    model = load_model(spec)
    g = model.graph
    gen = torch.Generator().manual_seed(0)
    edges = (torch.rand(g.n_writers, g.n_readers, generator=gen) < 0.25) & g.valid
    c = Circuit(g, edges)
    assert 0 < c.n_effective < c.n_edges  # the draw has both kinds
    clean = torch.randint(0, 1000, (3, 6), generator=gen)
    corrupted = torch.randint(0, 1000, (3, 6), generator=gen)
    engine = MaskedModel(model)
    with torch.no_grad():
        whole = engine(clean, corrupted, edge_mask=c.edge_mask())
        acting = engine(clean, corrupted, edge_mask=c.effective().edge_mask())
        # removing an effective edge does change the output: the count is not an over-estimate
        i, j = c.effective_mask.nonzero()[0].tolist()
        fewer = c.effective().edges.clone()
        fewer[i, j] = False
        changed = engine(clean, corrupted, edge_mask=fewer.float())
    assert (whole - acting).abs().max().item() <= 1e-5
    assert (whole - changed).abs().max().item() > 1e-5


def test_effective_cut_keeps_the_shortest_prefix_of_the_ranking():
    g = Graph(3, 4, 2)
    scores = torch.rand(g.n_writers, g.n_readers, generator=torch.Generator().manual_seed(1))
    for k in (1, 10, 40, g.n_edges // 3):
        c = Circuit.from_scores_effective(g, scores, k)
        assert c.n_effective == c.n_edges >= k  # only effective edges, at least k of them
        prefix = c.meta["ranked_prefix"]
        assert Circuit.from_scores(g, scores, prefix).n_effective == c.n_edges
        assert Circuit.from_scores(g, scores, prefix - 1).n_effective < k
    assert Circuit.from_scores_effective(g, scores, 0).n_edges == 0
    assert Circuit.from_sparsity(g, scores, 0.0, cut="effective").n_edges == g.n_edges


def test_random_ranking_cut_by_effective_edges_is_connected():
    """A raw cut of a random ranking at 2% of the edges leaves almost nothing on a path; the effective
    cut walks the ranking until 2% act."""
    g = Graph(30, 9, 3)  # smollm2-135m's shape
    scores = torch.rand(g.n_writers, g.n_readers, generator=torch.Generator().manual_seed(0))
    raw = Circuit.from_sparsity(g, scores, 0.98, cut="edges")
    eff = Circuit.from_sparsity(g, scores, 0.98, cut="effective")
    assert raw.n_effective < raw.n_edges // 4
    assert eff.n_effective >= raw.n_edges
