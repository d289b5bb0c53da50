"""Batched ACDC trials: the engine's K-copy retry (``column=``) equals K single passes, and a
search that tries K candidate edges of a reader per pass finds the sequential search's circuit with
the same loss increases."""
import pytest
import torch

from circuitbench import MaskedModel, load_model
from circuitbench.method import CostMeter
from circuitbench.batches import BatchPlan
from methods.acdc import ACDC, run_acdc, trial_width
from methods_support import SyntheticTask, make_examples

# increases are differences of mean KLs summed in another order (a K-copy pass reads with other
# matrix shapes): equal to float rounding, far below any threshold
ATOL = 1e-5


@pytest.fixture(scope="module", params=["random:gpt2-tiny", "random:llama-tiny", "random:neox-tiny"])
def tiny(request):
    model = load_model(request.param)
    return model, MaskedModel(model)


def _batch(model, seed, B=3, S=7):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 1000, (B, S), generator=gen)
    corrupted = torch.randint(0, 1000, (B, S), generator=gen)
    attention = torch.ones(B, S, dtype=torch.long)
    attention[1, :2] = 0  # one left-padded example: the copies' attention needs a per-example mask
    return clean, corrupted, attention, torch.tensor([6, 5, 4])


# ---- the engine: K copies in one pass -----------------------------------------------------------
@pytest.mark.parametrize("ablation", ["interchange", "zero"])
def test_column_pass_equals_separate_passes(tiny, ablation):
    """For every reader: K copies whose masks differ in that reader's column give the logits of K
    separate passes, restarted or not, with or without the shared later reads (``share_reads``) and,
    at attention slots, with only the changed heads recomputed (``heads``); the stack is
    left as it was."""
    model, eng = tiny
    g = model.graph
    clean, corrupted, attention, pos = _batch(model, 0)
    cache = eng.corrupted_cache(corrupted, attention, ablation=ablation)
    gen = torch.Generator().manual_seed(1)
    K = 4
    with torch.no_grad():
        for reader in range(g.n_readers):
            slot = g.read_slot(reader)
            mask = torch.ones(g.n_writers, g.n_readers)  # readers before this one: the full model
            mask[:, reader + 1:] = (torch.rand(g.n_writers, g.n_readers - reader - 1, generator=gen) > 0.3).float()
            mask[:, g.logits_reader] = 1.0
            values = (torch.rand(K, g.n_writers, generator=gen) > 0.4).float()
            want = []
            for k in range(K):
                m = mask.clone()
                m[:, reader] = values[k]
                want.append(eng(clean, attention_mask=attention, edge_mask=m, positions=pos, corrupted=cache))
            want = torch.cat(want)
            attention_slot = slot % 2 == 0 and slot < 2 * g.n_layers
            for fresh in ([None, []] if attention_slot else [None]):
                # the current circuit's rows (readers before this one are the full model's)
                state = eng.begin(clean, attention_mask=attention, edge_mask=mask, positions=pos, corrupted=cache)
                kept = state.stack.clone()
                for _ in range(2):  # the second pass reads the later reads' shared parts from the state
                    got = eng.retry(state, mask, slot=slot, heads=fresh, column=(reader, values), share_reads=True)
                    assert got.shape == want.shape
                    assert torch.allclose(got, want, atol=1e-5), (reader, fresh, (got - want).abs().max())
                    assert torch.equal(state.stack, kept)
                assert slot == 2 * g.n_layers or state.shared  # later reads stored their shared part


def test_column_pass_shares_prefix_with_single_passes(tiny):
    """Single trials and K-copy passes at one slot share the state's later reads (ACDC mixes them)."""
    model, eng = tiny
    g = model.graph
    clean, corrupted, attention, pos = _batch(model, 2)
    cache = eng.corrupted_cache(corrupted, attention)
    B = clean.shape[0]
    with torch.no_grad():
        state = eng.begin(clean, attention_mask=attention, positions=pos, corrupted=cache)
        reader = g.mlp_reader(0)
        mask = torch.ones(g.n_writers, g.n_readers)
        single = mask.clone()
        single[0, reader] = 0.0
        eng.retry(state, single, slot=1, share_reads=True)  # fills the shared reads (and rewrites the stack from slot 1)
        shared = dict(state.shared)
        assert shared
        values = torch.ones(3, g.n_writers)
        values[1:, 0] = 0.0
        values[2:, 1] = 0.0
        got = eng.retry(state, mask, slot=1, column=(reader, values), share_reads=True)
        assert all(state.shared[key] is part for key, part in shared.items())  # read, not made again
        for k in range(3):
            m = mask.clone()
            m[:, reader] = values[k]
            want = eng(clean, attention_mask=attention, edge_mask=m, positions=pos, corrupted=cache)
            assert torch.allclose(got[k * B:(k + 1) * B], want, atol=1e-5)


def test_column_pass_rules(tiny):
    model, eng = tiny
    g = model.graph
    clean, corrupted, _, _ = _batch(model, 3)
    cache = eng.corrupted_cache(corrupted)
    state = eng.begin(clean, corrupted=cache)
    reader = g.mlp_reader(0)
    values = torch.ones(2, g.n_writers)
    with pytest.raises(ValueError, match="without autograd"):  # autograd on
        eng.retry(state, slot=1, column=(reader, values))
    with torch.no_grad():
        with pytest.raises(ValueError, match="slot"):
            eng.retry(state, slot=2, column=(reader, values))
        with pytest.raises(ValueError, match="values"):
            eng.retry(state, slot=1, column=(reader, values[:, :3]))
        assert g.read_slot(g.logits_reader) == 2 * g.n_layers
        assert [g.read_slot(r) for r in range(g.attn_readers(1).start, g.mlp_reader(1) + 1)] == \
            [2] * g.attn_readers_per_layer + [3]


# ---- the search -----------------------------------------------------------------------------------
def _search(eng, task, train, tau, batch_size, **kwargs):
    plan = BatchPlan(eng, task, train, batch_size, CostMeter(eng.device), 1e9, stack=True)
    stats = {}
    edges, increase, kl, trials = run_acdc(eng, task, plan, tau, CostMeter(eng.device), progress=False,
                                           stats=stats, **kwargs)
    return edges, increase, kl, trials, stats


def _assert_same_search(a, b):
    (e1, i1, kl1, n1, _), (e2, i2, kl2, n2, _) = a, b
    assert torch.equal(e1, e2)
    assert n1 == n2
    assert torch.equal(torch.isnan(i1), torch.isnan(i2))  # the same edges were tried
    assert torch.allclose(i1.nan_to_num(0), i2.nan_to_num(0), rtol=1e-4, atol=ATOL), \
        (i1 - i2).nan_to_num(0).abs().max()
    assert kl1 == pytest.approx(kl2, abs=ATOL)


@pytest.mark.parametrize("ablation", ["interchange", "zero"])
def test_batched_search_equals_sequential(tiny, ablation):
    model, eng = tiny
    task, train = SyntheticTask(ablation), make_examples(12)
    sequential = _search(eng, task, train, 3e-3, 6)
    assert 0 < int(sequential[0].sum()) < int(model.graph.valid.sum())  # some edges removed, some kept
    for width, adapt in ((2, False), (5, False), (8, True)):
        batched = _search(eng, task, train, 3e-3, 6, trial_batch=width, adapt=adapt)
        _assert_same_search(sequential, batched)
        assert batched[4]["passes"] < sequential[4]["passes"] == sequential[3]
        assert batched[4]["copies"] >= batched[3]  # every trial was a copy; some copies were wasted


def test_batched_search_without_head_subsets_or_kept_batches(tiny):
    """Every layer's heads recomputed, and batches prepared again for every pass: the same search."""
    model, eng = tiny
    task, train = SyntheticTask(), make_examples(8)
    sequential = _search(eng, task, train, 1e-2, 4)
    _assert_same_search(sequential, _search(eng, task, train, 1e-2, 4, trial_batch=4, head_subsets=False))
    plan = BatchPlan(eng, task, train, 4, CostMeter(eng.device), 0.0, stack=True)  # nothing kept
    assert not plan.keep_corrupted
    stats = {}
    got = run_acdc(eng, task, plan, 1e-2, CostMeter(eng.device), progress=False, trial_batch=4, stats=stats)
    _assert_same_search(sequential, (*got, stats))


def test_tracr_reverse_batched_equals_sequential():
    from circuitbench.tasks import get_task

    task = get_task("tracr-reverse")
    model = load_model(task.default_model)
    eng = MaskedModel(model)
    train = task.build(model.tokenizer, seed=0, n_train=40).train
    sequential = _search(eng, task, train, 1e-3, 40)
    assert 0 < int(sequential[0].sum()) < model.graph.n_edges
    _assert_same_search(sequential, _search(eng, task, train, 1e-3, 40, trial_batch=8))


@pytest.mark.slow
def test_smollm2_gt_batched_equals_sequential():
    """The quick preset's ACDC (tau 0.01, 4 training examples) on smollm2-135m's Greater-Than: the
    same circuit and increases one by one and batched (about 10 + 5 min on one CPU thread)."""
    from circuitbench.tasks import get_task

    model = load_model("smollm2-135m")
    eng = MaskedModel(model)
    task = get_task("gt")
    train = task.build(model.tokenizer, seed=0, n_train=4).train
    runs = [ACDC(preset="quick", trial_batch=k).discover(eng, task, train, None, [], progress=False)
            for k in (1, ACDC.Config.trial_batch)]
    (a,), (b,) = (list(r.circuits.values()) for r in runs)
    assert torch.equal(a.edges, b.edges) and 0 < a.n_edges < model.graph.n_edges
    assert torch.equal(torch.isnan(a.scores), torch.isnan(b.scores))
    assert torch.allclose(a.scores.nan_to_num(0), b.scores.nan_to_num(0), rtol=1e-4, atol=ATOL)
    assert runs[0].info["taus"][0]["trials"] == runs[1].info["taus"][0]["trials"]


# ---- the width rule ---------------------------------------------------------------------------------
def test_trial_width_follows_the_adapter_and_memory(tiny, monkeypatch):
    from circuitbench.errors import UserError

    model, eng = tiny
    task, train = SyntheticTask(), make_examples(8)
    plan = BatchPlan(eng, task, train, 4, CostMeter(eng.device), 4096.0, stack=True)
    assert trial_width(eng, plan, 8) == {"trial_batch_requested": 8, "trial_batch": 8}
    assert trial_width(eng, plan, 1)["trial_batch"] == 1
    with pytest.raises(UserError):
        trial_width(eng, plan, 0)
    with pytest.raises(UserError, match="trial_batch"):
        ACDC(trial_batch=0).discover(eng, task, train, None, [], progress=False)
    per_copy = 2 * plan.batch_rows_mib(model.graph.n_writers)
    small = BatchPlan(eng, task, train, 4, CostMeter(eng.device), 0.0, stack=True)
    small.cache_mib = small.reference_mib() + 3.5 * per_copy  # room for 3 copies, nothing kept
    got = trial_width(eng, small, 8)
    assert got["trial_batch"] == 3 and "cache_mib" in got["trial_batch_reason"]
    monkeypatch.setattr(model.adapter, "head_subsets", False)
    got = trial_width(eng, plan, 8)
    assert got["trial_batch"] == 1 and "head subsets" in got["trial_batch_reason"]


def test_discover_records_the_width(tiny):
    model, eng = tiny
    res = ACDC(taus=(1e-2,), trial_batch=4).discover(eng, SyntheticTask(), make_examples(8), None, [],
                                                     progress=False)
    assert res.info["trial_batch"] == 4
    row = res.info["taus"][0]
    assert row["passes"] <= row["trials"] <= row["copies"]


# ---- the benchmarks -----------------------------------------------------------------------------
def test_search_benchmark_compares_both_widths():
    from methods.benchmarks import acdc_search_benchmark

    result = acdc_search_benchmark("random:gpt2-tiny", threads=1, progress=False, task="ioi", n_train=4)
    assert result["same_circuit"] and result["same_edges_tried"] and result["max_increase_difference"] < ATOL
    assert result["sequential_trials"] == result["batched_trials"] > 0
    assert result["batched_passes"] < result["sequential_passes"] == result["sequential_trials"]
    assert result["batched_trials_per_s_ratio"] > 0 and result["trial_batch"] == ACDC.Config.trial_batch


def test_methods_benchmark_reports_the_batched_trial():
    from methods.benchmarks import methods_benchmark

    result = methods_benchmark("random:gpt2-tiny", batch=2, seq=5, threads=1, repeats=1, memory=False,
                               progress=False)
    assert result["acdc_trial_batch"] == ACDC.Config.trial_batch
    assert result["acdc_batched_trial_over_plain_forward"] > 0 and result["acdc_batched_speedup"] > 0
