"""Tracr compiled models (issue 7): adapter == Tracr on the whole domain, fixed ground truths, tasks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import circuitbench
from circuitbench.errors import UserError
from circuitbench.tasks import TASKS, get_task
from circuitbench.tracr import get_program, ground_truth, ground_truth_directions, load_tracr
from circuitbench.tracr.exported import load_arrays, load_metadata, load_reference
from circuitbench.tracr.ground_truth import component_spaces, inert_edges, zero_ablation_forward

NAMES = ["xproportion", "reverse"]

# Fixed by hand from the derivation in circuitbench/tracr/ground_truth.py (subspace edges minus
# the inert ones). They equal the ACDC paper's Tracr ground truths mapped onto this graph.
GROUND_TRUTH = {
    "xproportion": [
        "input->m0",
        "input->a1.h0<q>",
        "input->a1.h0<k>",
        "m0->a1.h0<v>",
        "a1.h0->logits",
    ],
    "reverse": [
        "input->a0.h0<v>",
        "input->m0",
        "input->m1",
        "input->a3.h0<k>",
        "input->a3.h0<v>",
        "a0.h0->m0",
        "m0->m1",
        "m1->m2",
        "m2->a3.h0<q>",
        "a3.h0->logits",
    ],
}
# Edges through which the compiler's subspaces connect but nothing reaches the output.
INERT = {
    "xproportion": [],
    "reverse": ["input->a0.h0<q>", "input->a0.h0<k>", "input->a3.h0<q>"],
}


def domain_batch(name):
    """Every input of the domain, BOS-prefixed and right-padded, from the committed reference."""
    ref = load_reference(name)
    ids = torch.as_tensor(ref["ids"])
    lengths = torch.as_tensor(ref["lengths"])
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    return ref, ids, mask


def scored_mask(mask):
    scored = mask.bool().clone()
    scored[:, 0] = False
    return scored


# ---- the adapter equals Tracr ------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_reference_covers_the_whole_domain(name):
    spec = get_program(name)
    ref, ids, mask = domain_batch(name)
    n_inputs = sum(len(spec.vocab) ** n for n in range(1, spec.max_seq_len + 1))
    assert len(ids) == n_inputs == len(spec.domain()) == {"xproportion": 1364, "reverse": 363}[name]
    assert len({tuple(row[: int(m.sum())]) for row, m in zip(ids.tolist(), mask)}) == n_inputs


@pytest.mark.parametrize("name", NAMES)
def test_adapter_equals_tracr_on_every_input(name):
    model = circuitbench.load_model(f"tracr:{name}")
    ref, ids, mask = domain_batch(name)
    valid = mask.bool()
    tracr_scores = torch.as_tensor(ref["scores"])
    engine = circuitbench.MaskedModel(model)
    ours = engine.reference(ids, attention_mask=mask)
    assert ours.shape == tracr_scores.shape
    assert torch.allclose(ours[valid], tracr_scores[valid], atol=1e-5, rtol=0)
    # the masked pass with every edge kept is the same model
    masked = engine(ids, None, attention_mask=mask, ablation="zero")
    assert torch.allclose(masked[valid], tracr_scores[valid], atol=1e-5, rtol=0)
    # and so is the engine-free forward written from the Adapter methods alone
    plain = zero_ablation_forward(model.adapter, ids, mask, model.graph.full_mask())
    assert torch.allclose(plain[valid], tracr_scores[valid], atol=1e-5, rtol=0)
    scored = scored_mask(mask)
    if name == "xproportion":
        assert torch.allclose(ours[..., 0][valid], torch.as_tensor(ref["output"])[valid], atol=1e-5, rtol=0)
    else:  # Tracr's decoded output is the argmax of these scores (BOS position excluded)
        assert torch.equal(ours.argmax(-1)[scored], torch.as_tensor(ref["output"])[scored])


@pytest.mark.parametrize("name", NAMES)
def test_tracr_outputs_are_the_programs_outputs(name):
    """The committed Tracr outputs agree with the RASP interpreter and with programs.semantics."""
    spec = get_program(name)
    ref, ids, mask = domain_batch(name)
    rasp = ref["rasp"]
    for i, seq in enumerate(spec.domain()):
        n = len(seq)
        truth = spec.semantics(list(seq))
        if spec.output == "categorical":
            assert [spec.output_values[j] for j in rasp[i, :n]] == truth
            assert [spec.output_values[j] for j in ref["output"][i, 1:n + 1]] == truth
        else:
            np.testing.assert_allclose(rasp[i, :n], truth, atol=1e-12)
            np.testing.assert_allclose(ref["output"][i, 1:n + 1], truth, atol=1e-6)


def test_batch_padding_does_not_change_outputs():
    """A short input padded into a batch with a long one gives the same outputs as alone."""
    model = circuitbench.load_model("tracr:reverse")
    tok = model.tokenizer
    engine = circuitbench.MaskedModel(model)
    alone = engine.reference(torch.tensor([tok.encode([3, 1], add_bos=True)]))
    ids = torch.tensor([tok.encode([3, 1], add_bos=True) + [tok.pad_id] * 3, tok.encode([1, 2, 3, 3, 2], add_bos=True)])
    mask = (ids != tok.pad_id).long()
    batched = engine.reference(ids, attention_mask=mask)
    assert torch.allclose(batched[0, :3], alone[0], atol=1e-6)
    assert [tok.decode_output(i) for i in batched[1, 1:].argmax(-1).tolist()] == ["2", "3", "3", "2", "1"]


# ---- loading, tokenizer, shapes ------------------------------------------------------------------
def test_load_model_and_tokenizer():
    model = circuitbench.load_model("tracr:xproportion")
    assert model.adapter.family == "tracr" and model.adapter.causal is False
    assert model.graph.summary()["layers"] == 2 and model.graph.n_heads == 1
    assert circuitbench.load_model("tracr:reverse").graph.n_layers == 4
    tok = model.tokenizer
    assert tok.vocab[tok.bos_id] == "BOS" and tok.vocab[tok.pad_id] == "compiler_pad"
    ids = tok.encode(["a", "x", "x"], add_bos=True)
    assert tok.decode(ids) == ["BOS", "a", "x", "x"]
    assert tok.encode(["BOS", "a", "x", "x"]) == ids
    out = circuitbench.MaskedModel(model).reference(torch.tensor([ids]))
    assert out.shape == (1, 4, 1)
    assert torch.allclose(out[0, 1:, 0], torch.tensor([0.0, 0.5, 2 / 3]), atol=1e-6)
    rev_tok = circuitbench.load_model("tracr:reverse").tokenizer
    assert rev_tok.encode([1, 2]) == rev_tok.encode(["1", "2"]) and rev_tok.output_values == ["1", "2", "3"]


def test_bad_inputs_are_user_errors():
    adapter, tok = load_tracr("xproportion")
    with pytest.raises(UserError, match="not in the vocabulary"):
        tok.encode(["a", "z"])
    with pytest.raises(UserError, match="at most 6 tokens"):
        tok.encode(["a"] * 6, add_bos=True)
    with pytest.raises(UserError, match="at most 6 tokens"):
        adapter.embed(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(UserError, match="numerical output"):
        tok.decode_output(0)
    with pytest.raises(UserError, match="unknown Tracr program"):
        load_tracr("sort")
    with pytest.raises(UserError, match="unknown Tracr program"):
        circuitbench.load_model("tracr:sort")


def test_unused_slots_are_zero_and_graph_shape_is_uniform():
    """Layers without an MLP (or attention) exist in the graph and output exactly zero."""
    adapter, tok = load_tracr("xproportion")
    x = torch.randn(2, 4, adapter.d_model)
    assert torch.equal(adapter.mlp(1, x), torch.zeros_like(x))  # xproportion: attention-only layer 1
    heads = adapter.attention(0, x[None], adapter.context(4, None, x.device))
    assert heads.shape == (1, 2, 4, adapter.d_model) and not heads.any()
    meta = load_metadata("reverse")
    assert [c["name"] for c in meta["components"]] == ["a0.h0", "m0", "m1", "m2", "a3.h0"]


# ---- ground truth ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_ground_truth_edges_are_fixed(name):
    assert ground_truth(name) == GROUND_TRUTH[name]
    assert inert_edges(name) == INERT[name]
    every = ground_truth(name, include_inert=True)
    assert sorted(every) == sorted(GROUND_TRUTH[name] + INERT[name])
    graph = circuitbench.load_model(f"tracr:{name}").graph
    for edge in every:
        graph.parse_edge(edge)  # a valid edge of the model's graph


def test_ground_truth_directions_name_the_sops():
    x = ground_truth_directions("xproportion")
    assert x["m0->a1.h0<v>"] == ["is_x"]
    assert x["input->m0"] == ["tokens:x"]
    assert x["a1.h0->logits"] == ["frac_prevs"]
    r = ground_truth_directions("reverse")
    assert r["a0.h0->m0"] == ["length_selector_width_attn_output"]
    assert r["m0->m1"] == [f"length:{i}" for i in range(6)]
    assert r["input->a3.h0<v>"] == ["tokens:1", "tokens:2", "tokens:3"]
    # the compiler declares tokens:BOS in xproportion's value space, but its weight row is zero
    declared_v = next(c for c in load_metadata("xproportion")["components"] if c["name"] == "a1.h0")["reads_v"]
    assert "tokens:BOS" in declared_v and component_spaces("xproportion")["a1.h0"]["reads_v"] == ["is_x"]


@pytest.mark.parametrize("name", NAMES)
def test_ground_truth_circuit_is_the_model_and_every_edge_matters(name):
    """Zero-ablating everything outside the ground truth leaves the outputs unchanged; removing any
    one ground-truth edge changes some output substantially; inert edges change nothing."""
    model = circuitbench.load_model(f"tracr:{name}")
    graph = model.graph
    engine = circuitbench.MaskedModel(model)
    _, ids, mask = domain_batch(name)
    scored = scored_mask(mask)
    cache = engine.corrupted_cache(ids, mask, ablation="zero")
    full = engine.reference(ids, attention_mask=mask)

    def change(edges):
        edge_mask = torch.zeros(graph.n_writers, graph.n_readers)
        for edge in edges:
            edge_mask[graph.parse_edge(edge)] = 1
        out = engine(ids, None, attention_mask=mask, edge_mask=edge_mask, ablation="zero", corrupted=cache)
        return float((out - full)[scored].abs().max())

    gt = GROUND_TRUTH[name]
    assert change(gt) < 1e-4
    assert change([]) > 0.5
    for edge in gt:
        assert change([e for e in gt if e != edge]) > 0.5, edge
    for edge in INERT[name]:
        assert change(gt + [e for e in INERT[name] if e != edge]) < 1e-4


# ---- tasks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("task_name,name", [("tracr-xproportion", "xproportion"), ("tracr-reverse", "reverse")])
def test_task_builds_the_domain_and_scores_the_full_model(task_name, name):
    assert task_name in TASKS
    task = get_task(task_name)
    assert task.ablation == "zero" and task.default_model == f"tracr:{name}"
    assert task.ground_truth() == GROUND_TRUTH[name]
    model = circuitbench.load_model(task.default_model)
    splits = task.build(model.tokenizer)
    spec = get_program(name)
    ex = splits.test
    assert len(ex) == len(spec.domain()) == len(splits.train) == len(splits.validation)
    assert ex.positions.shape == (len(ex), 5) and splits.dropped == {"train": 0, "validation": 0, "test": 0}
    # targets are the program's outputs at the scored positions
    lengths = ex.attention_mask.sum(1) - 1
    assert torch.equal(ex.targets["scored"].sum(1), lengths)
    engine = circuitbench.MaskedModel(model)
    full = engine.reference(ex.clean, ex.attention_mask, ex.positions)
    scores = task.score(full, full, ex)
    assert set(scores) == set(task.metrics)
    assert float(task.loss(full, full, ex).abs().max()) < 1e-6
    if name == "xproportion":
        assert float(scores["mse"].max()) < 1e-10
    else:
        assert float(scores["accuracy"].min()) == 1.0 and float(scores["exact_match"].min()) == 1.0
    # corrupted inputs are other inputs of the same length
    assert torch.equal(ex.corrupted.ne(model.tokenizer.pad_id), ex.attention_mask.bool())
    # the empty circuit under zero ablation is far from the model
    cache = engine.corrupted_cache(ex.clean, ex.attention_mask, ablation="zero")
    empty = engine(ex.clean, None, ex.attention_mask, edge_mask=torch.zeros(model.graph.n_writers, model.graph.n_readers),
                   positions=ex.positions, ablation="zero", corrupted=cache)
    assert float(task.loss(empty, full, ex).mean()) > 0.1
    # objective is differentiable and higher for the full model than the empty circuit
    assert float(task.objective(full, ex).mean()) > float(task.objective(empty, ex).mean())


def test_task_subsets_and_bad_tokenizer():
    task = get_task("tracr-reverse")
    tok = circuitbench.load_model("tracr:reverse").tokenizer
    small = task.build(tok, seed=1, n_train=40)
    assert len(small.train) == 40 and len(small.test) == 363
    again = task.build(tok, seed=1, n_train=40)
    assert torch.equal(small.train.clean, again.train.clean)
    batch = small.train.select([0, 1, 2])
    assert batch.clean.shape[1] == int(batch.attention_mask.sum(1).max())
    with pytest.raises(UserError, match="whole domain"):
        task.build(tok, n_train=1000)
    with pytest.raises(UserError, match="tracr:reverse"):
        task.build(circuitbench.load_model("tracr:xproportion").tokenizer)


# ---- recovery by Edge Pruning --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("task_name", ["tracr-xproportion", "tracr-reverse"])
def test_edge_pruning_paper_preset_recovers_the_ground_truth(task_name):
    """Edge Pruning with the paper's Tracr settings finds exactly the ground-truth circuit for seeds
    0, 1 and 2 (one CPU thread: about 4 s a seed for xproportion, 35 s for reverse)."""
    from methods.edge_pruning import EdgePruning

    task = get_task(task_name)
    model = circuitbench.load_model(task.default_model)
    engine = circuitbench.MaskedModel(model)
    splits = task.build(model.tokenizer)
    truth = task.ground_truth()
    sparsity = 1 - len(truth) / model.graph.n_edges
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        res = EdgePruning(preset="paper").discover(engine, task, splits.train, splits.validation, [sparsity],
                                                   seed=seed, progress=False)
        assert sorted(res.circuits[sparsity].edge_names) == sorted(truth), f"seed {seed}"


# ---- live recompilation ----------------------------------------------------------------------------
# Needs tracr-pypi, jax and dm-haiku (the test extra installs them; without them the test fails, see
# require_modules.py). About 15 s per program on a 2-core CPU, so it runs in CI.
@pytest.mark.parametrize("name", NAMES)
def test_recompile_with_tracr_matches_committed_export(name):
    for module in ("tracr", "jax", "haiku"):
        pytest.importorskip(module)
    from circuitbench.tracr import compile as tracr_compile

    compiled = tracr_compile.compile_program(name)
    arrays, meta = tracr_compile.export_arrays(compiled)
    committed = load_arrays(name)
    assert set(arrays) == set(committed)
    for key in arrays:
        np.testing.assert_array_equal(arrays[key], committed[key], err_msg=key)
    stored = load_metadata(name)
    skip = {"tracr_version", "jax_version"}
    assert {k: v for k, v in meta.items() if k not in skip} == {k: v for k, v in stored.items() if k not in skip}
    live = tracr_compile.reference_outputs(compiled, arrays)
    reference = load_reference(name)
    for key in live:
        np.testing.assert_allclose(live[key], reference[key], atol=1e-6, err_msg=key)
    # Tracr's public apply() on a few inputs agrees with the adapter
    adapter, tok = load_tracr(name)
    engine_model = circuitbench.load_model(f"tracr:{name}")
    engine = circuitbench.MaskedModel(engine_model)
    for seq in get_program(name).domain()[:: 37]:
        decoded = compiled["assembled"].apply(["BOS", *seq]).decoded[1:]
        out = engine.reference(torch.tensor([tok.encode(seq, add_bos=True)]))[0, 1:]
        if meta["output"] == "categorical":
            assert [tok.decode_output(i) for i in out.argmax(-1).tolist()] == [str(v) for v in decoded]
        else:
            np.testing.assert_allclose(out[:, 0].numpy(), np.array(decoded, dtype=np.float32), atol=1e-5)
