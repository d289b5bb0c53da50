"""Edge counts, names, circuit files (native, EAP-IG/MIB, Edge Pruning) and the graph command."""
import json
import subprocess
import sys

import pytest
import torch

from circuitbench import Graph, UserError, load_model
from circuitbench.circuit import Circuit, edges_for_sparsity


def test_gpt2_small_has_32491_edges():
    assert Graph(12, 12).n_edges == 32491
    assert load_model("random:gpt2-small").graph.n_edges == 32491


def _count_from_first_principles(L, H, G, mlp=True):
    """Count edges by walking the forward pass: every reader reads every writer computed before it."""
    writers_so_far, edges = 1, 0  # the input embedding
    for _ in range(L):
        edges += (H + 2 * G) * writers_so_far  # q per head, k and v per key/value group
        writers_so_far += H
        if mlp:
            edges += writers_so_far  # the MLP reads this layer's heads too
            writers_so_far += 1
    return edges + writers_so_far  # the logits read everything


@pytest.mark.parametrize("L,H,G", [(2, 4, 2), (30, 9, 3), (40, 40, 40), (32, 32, 8)])
def test_llama_counts(L, H, G):
    g = Graph(L, H, G)
    assert g.n_edges == _count_from_first_principles(L, H, G)
    assert g.n_edges == int(g.valid.sum())
    if g.n_edges < 100_000:  # naming millions of edges is slow and adds nothing
        assert len(g.edge_names) == g.n_edges
    assert g.n_writers == 1 + L * (H + 1)
    assert g.n_readers == L * (H + 2 * G + 1) + 1


def test_smollm2_shape_and_codellama_13b_count():
    # SmolLM2-135M: 30 layers, 9 heads, 3 key/value heads
    assert Graph(30, 9, 3).n_edges == _count_from_first_principles(30, 9, 3)
    # CodeLlama-13B (40 layers, 40 heads, no GQA). The paper's 3,872,820 edges leave out the
    # embedding's outgoing edges (its Llama runs had no prunable embedding node): one per reader.
    g = Graph(40, 40)
    assert g.n_edges - int(g.valid[0].sum()) == 3872820
    assert int(g.valid[0].sum()) == g.n_readers


def test_names_roundtrip_and_validity():
    g = Graph(3, 4, 2)
    assert g.reader_names[:8] == ["a0.h0<q>", "a0.h1<q>", "a0.h2<q>", "a0.h3<q>",
                                  "a0.g0<k>", "a0.g1<k>", "a0.g0<v>", "a0.g1<v>"]
    for k, name in enumerate(g.edge_names):
        i, j = g.parse_edge(name)
        assert tuple(g.edge_index[k].tolist()) == (i, j)
    assert g.parse_edge("a0.h1->m0") == (g.writer_index["a0.h1"], g.mlp_reader(0))
    with pytest.raises(ValueError, match="backwards"):
        g.parse_edge("m1->a0.h0<q>")
    with pytest.raises(ValueError, match="unknown"):
        g.parse_edge("a9.h9->logits")


def _random_circuit(g, n=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(g.n_writers, g.n_readers, generator=gen)
    return Circuit.from_scores(g, scores, n)


def test_from_scores_cuts_exact_counts():
    g = Graph(2, 4)
    c = _random_circuit(g, 40)
    assert c.n_edges == 40
    assert c.sparsity == pytest.approx(1 - 40 / g.n_edges)
    kept = c.scores.abs()[c.edges]
    dropped = c.scores.abs()[g.valid & ~c.edges]
    assert kept.min() >= dropped.max()
    assert edges_for_sparsity(g, 0.0) == g.n_edges and edges_for_sparsity(g, 1.0) == 0
    with pytest.raises(UserError):
        edges_for_sparsity(g, 1.5)


@pytest.mark.parametrize("fmt", ["circuitbench", "eap", "edge-pruning"])
def test_circuit_file_roundtrip(tmp_path, fmt):
    g = Graph(2, 4)
    c = _random_circuit(g)
    path = tmp_path / f"c.{fmt}.json"
    c.save(path, format=fmt)
    back = Circuit.load(path, g)
    assert torch.equal(back.edges, c.edges)
    if fmt in ("circuitbench", "eap"):
        assert torch.allclose(back.scores[g.valid], c.scores[g.valid])


def test_edge_pruning_names_and_embedding_convention(tmp_path):
    g = Graph(2, 4)
    data = [["tok_embeds", "a1.h2.q"], ["pos_embeds", "a1.h2.q"], ["a0.h1", "m0"], ["m1", "resid_post"],
            ["a0.h3", "a1.h0.v"]]
    path = tmp_path / "edges.json"
    path.write_text(json.dumps(data))
    c = Circuit.load(path, g)
    assert sorted(c.edge_names) == sorted(["input->a1.h2<q>", "a0.h1->m0", "m1->logits", "a0.h3->a1.h0<v>"])
    # without embedding writers the run could not prune the embeddings: every input edge is kept
    path.write_text(json.dumps(data[2:]))
    c = Circuit.load(path, g)
    assert c.edges[0].sum() == g.valid[0].sum()


def test_eap_format_is_mib_shaped():
    g = Graph(2, 4)
    d = _random_circuit(g).to_eap()
    assert set(d) == {"cfg", "nodes", "edges"}
    assert len(d["edges"]) == g.n_edges
    some = next(iter(d["edges"].values()))
    assert set(some) == {"score", "in_graph"}


def test_bad_circuit_files(tmp_path):
    g = Graph(2, 4)
    bad = tmp_path / "bad.json"
    for text, msg in [("{nope", "not valid JSON"), ('{"x": 1}', "unrecognised"),
                      ('[["a0.h0", "m9"]]', "unknown edge"), ('[["m1", "a0.h0.q"]]', "backwards"),
                      ('{"format": "circuitbench", "graph": {"layers": 5, "heads": 4, "kv_heads": 4}, "edges": []}',
                       "graph")]:
        bad.write_text(text)
        with pytest.raises(UserError, match=msg):
            Circuit.load(bad, g)
    with pytest.raises(UserError, match="does not exist"):
        Circuit.load(tmp_path / "missing.json", g)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "circuitbench", *args], capture_output=True, text=True)


def test_graph_command_json_and_circuit(tmp_path):
    out = _cli("graph", "--model", "random:gpt2-small", "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert (d["writers"], d["readers"], d["edges"]) == (157, 445, 32491)
    g = load_model("random:gpt2-tiny").graph
    path = tmp_path / "c.json"
    _random_circuit(g, 25).save(path)
    out = _cli("graph", "--model", "random:gpt2-tiny", "--circuit", str(path), "--json")
    assert json.loads(out.stdout)["circuit"]["edges"] == 25


@pytest.mark.parametrize("args,msg", [
    (["graph", "--model", "random:nope"], "unknown random model"),
    (["graph", "--model", "./no/such/folder"], "does not exist"),
    (["graph", "--model", "tracr:nope"], "unknown Tracr program"),
    (["graph", "--model", "random:gpt2-tiny", "--circuit", "/no/such.json"], "does not exist"),
    (["graph"], "required"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_exit_2(args, msg):
    out = _cli(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in out.stderr


def test_unsupported_architecture_folder(tmp_path):
    from transformers import BertConfig
    BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="unsupported architecture") as err:
        load_model(str(tmp_path))
    # issue 17: the message names the folder's family and every supported one
    for name in ("'bert'", "gpt2", "llama", "qwen2", "gpt_neox", "gemma2", "gemma3_text"):
        assert name in str(err.value), name
    for cmd in (["graph", "--model", str(tmp_path)],
                ["run", "--model", str(tmp_path), "--methods", "eap", "--task", "ioi", "--dry-run"]):
        out = _cli(*cmd)
        assert out.returncode == 2, cmd
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "unsupported architecture 'bert'" in lines[0] and "Traceback" not in out.stderr


def test_local_folder_loads(tmp_path):
    m = load_model("random:gpt2-tiny")
    m.hf_model.save_pretrained(tmp_path)
    again = load_model(str(tmp_path))
    ids = torch.randint(0, 500, (2, 5))
    assert torch.allclose(again.hf_model(ids).logits, m.hf_model(ids).logits)


def test_graph_to_dict_and_back():
    for g in (Graph(2, 4), Graph(3, 4, 2), Graph(2, 2, has_mlp=False), Graph(2, 4, parallel=True)):
        d = g.to_dict()
        assert Graph.from_dict(d) == g and Graph.from_dict(json.loads(json.dumps(d))) == g
        assert d["edges"] == g.n_edges and ("parallel" in d) == g.parallel  # sequential records keep their bytes
    assert list(Graph(2, 4).to_dict()) == ["layers", "heads", "kv_heads", "n_kv_heads", "has_mlp", "edges"]
    # a circuit file keeps the shape's first three keys (and parallel), from which the graph is read back
    for g in (Graph(3, 4, 2), Graph(2, 4, parallel=True)):
        shape = Circuit.empty(g).to_dict()["graph"]
        assert shape == {k: v for k, v in g.to_dict().items() if k in ("layers", "heads", "kv_heads", "parallel")}
        assert Graph.from_dict(shape) == g


@pytest.mark.parametrize("layers,heads,kv,parallel", [(3, 4, None, False), (2, 6, 2, False), (2, 4, None, True)])
def test_read_slots(layers, heads, kv, parallel):
    """`Graph.slots`: 2L + 1 read points in forward order whose readers tile the readers, each
    reading the prefix of writers its readers' edges come from; the writers computed from them tile
    the writers after the input; `reader_order` visits every reader once, last slot first."""
    g = Graph(layers, heads, kv, parallel=parallel)
    slots = g.slots
    assert len(slots) == g.n_slots == 2 * layers + 1 and [s.index for s in slots] == list(range(g.n_slots))
    assert g.logits_slot == 2 * layers and slots[-1].kind == "logits" and slots[-1].name == "logits"
    assert [s.name for s in slots[:4]] == ["a0", "m0", "a1", "m1"]
    assert [r for s in slots for r in range(s.readers.start, s.readers.stop)] == list(range(g.n_readers))
    assert [w for s in slots for w in range(s.writers.start, s.writers.stop)] == list(range(1, g.n_writers))
    for s in slots:
        assert s.writers.start == s.before and s.reads <= s.before
        for r in range(s.readers.start, s.readers.stop):
            assert g.read_slot(r) == s.index
            assert g.valid[:, r].tolist() == [w < s.reads for w in range(g.n_writers)]
    for l in range(layers):
        attn, mlp = slots[2 * l], slots[2 * l + 1]
        assert (attn.kind, attn.layer, mlp.kind, mlp.layer) == ("attn", l, "mlp", l)
        assert mlp.before == attn.before + heads  # the layer's heads come before its MLP slot
        assert mlp.reads == (attn.reads if parallel else mlp.before)  # a parallel MLP skips its layer's heads
    for r, name in enumerate(g.reader_names):  # the node a reader feeds, from the names
        nodes = [g.writer_names[w] for w in g.reader_nodes(r)]
        if name == "logits":
            assert nodes == []
        elif name.endswith("<q>") or not g.grouped and name[-3:] in ("<k>", "<v>"):
            assert nodes == [name[:-3]]
        elif name[-3:] in ("<k>", "<v>"):
            layer, group = name[1:-3].split(".g")
            per = heads // g.kv_heads
            assert nodes == [f"a{layer}.h{h}" for h in range(int(group) * per, (int(group) + 1) * per)]
        else:
            assert nodes == [name]  # an MLP reader feeds its MLP
    order = g.reader_order()
    assert order[0] == (g.logits_reader, g.logits_slot)
    assert sorted(r for r, _ in order) == list(range(g.n_readers))
    assert all(slot == g.read_slot(r) for r, slot in order)
    assert [s for _, s in order] == sorted((s for _, s in order), reverse=True)
    with pytest.raises(ValueError):
        g.read_slot(g.n_readers)
