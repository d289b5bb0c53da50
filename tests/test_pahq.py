"""PAHQ (mixed-precision ACDC trials, `circuitbench.precision`): without a focus the mixed engine is
the model exactly; with a focus the focus heads (or MLP) are the model's adapter's outputs exactly
and every other head and MLP the low-precision copy's; ACDC with ``precision="pahq"`` finds float32
ACDC's circuits on Tracr programs and on tiny random models; bad settings are UserErrors."""
import pytest
import torch

from circuitbench import MaskedModel, load_model
from circuitbench.errors import UserError
from circuitbench.precision import MixedPrecisionAdapter, mixed_precision, resolve_low_dtype
from methods.acdc import ACDC
from methods_support import SyntheticTask, make_examples


@pytest.fixture(scope="module", params=["random:gpt2-tiny", "random:llama-tiny"])
def tiny(request):
    model = load_model(request.param)
    return model, mixed_precision(model)


def _one(result):
    assert len(result.circuits) == 1
    return next(iter(result.circuits.values()))


def _rows(present, part, per):
    """Rows of a reader input for heads ``present`` (query rows, then key and value rows of their
    groups; ``per`` heads per group) that the heads ``part`` read, in the adapter contract's order."""
    groups = sorted({h // per for h in present})
    n, m = len(present), len(groups)
    mine = sorted({h // per for h in part})
    return ([present.index(h) for h in part] + [n + groups.index(g) for g in mine]
            + [n + m + groups.index(g) for g in mine])


# ---- the adapter ------------------------------------------------------------------------------------
def test_without_focus_the_engine_is_the_model(tiny):
    model, mixed = tiny
    assert mixed.adapter.focus is None and mixed.graph.n_edges == model.graph.n_edges
    exact, eng = MaskedModel(model), MaskedModel(mixed)
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 1000, (3, 6), generator=gen)
    corrupted = torch.randint(0, 1000, (3, 6), generator=gen)
    mask = (torch.rand(model.graph.n_writers, model.graph.n_readers, generator=gen) > 0.3).float()
    with torch.no_grad():
        assert torch.equal(eng.reference(clean), exact.reference(clean))
        assert torch.equal(eng(clean, corrupted, edge_mask=mask), exact(clean, corrupted, edge_mask=mask))
        # with a focus the same pass is not the model's any more (the other heads are bfloat16)
        with mixed.adapter.focused(1, heads=[0]):
            assert not torch.equal(eng(clean, corrupted, edge_mask=mask), exact(clean, corrupted, edge_mask=mask))
        assert mixed.adapter.focus is None  # restored
    # autograd passes too (Edge Pruning, EAP on such an engine: every function is the model's)
    got = eng(clean, corrupted, edge_mask=mask.requires_grad_(True))
    assert torch.equal(got, exact(clean, corrupted, edge_mask=mask))


@pytest.mark.parametrize("shared", [True, False])
def test_focus_heads_are_exact_and_the_others_low(tiny, shared):
    """For each layer, with reader inputs shared or one row per reader, all heads or a subset:
    the focus head's output is the model's adapter's (exactly), every other head's the bfloat16
    copy's on its rows cast down (exactly), and both are close to the float32 layer's."""
    model, mixed = tiny
    a, ex, lo = mixed.adapter, model.adapter, mixed.adapter.shadow
    H, G, d = a.n_heads, a.n_kv_heads, a.d_model
    per = H // G
    B, S = 2, 5
    gen = torch.Generator().manual_seed(1)
    ctx = a.context(S, None, "cpu")
    assert isinstance(a, MixedPrecisionAdapter) and a.head_subsets == ex.head_subsets
    for layer in range(a.n_layers):
        for present in (list(range(H)), [0, H - 1]):
            heads = None if len(present) == H else torch.tensor(present)
            R = 1 if shared else len(present) + 2 * len({h // per for h in present})
            x = torch.randn(R, B, S, d, generator=gen)
            full = ex.attention(layer, x, ctx[0], True, heads)
            focus = present[-1]
            with a.focused(layer, heads=[focus]):
                got = a.attention(layer, x, ctx, True, heads)
                summed = a.attention(layer, x, ctx, False, heads)
            assert got.dtype == torch.float32 and got.shape == full.shape
            assert torch.allclose(summed, got.sum(0), atol=1e-6)
            others = [h for h in present if h != focus]
            pick = (lambda part: x) if shared else (lambda part: x[_rows(present, part, per)])
            want = ex.attention(layer, pick([focus]), ctx[0], True, torch.tensor([focus]))
            assert torch.equal(got[-1:], want)
            low = lo.attention(layer, pick(others).to(torch.bfloat16), ctx[1], True, torch.tensor(others))
            assert torch.equal(got[:-1], low.float())
            assert torch.allclose(got[-1], full[-1], atol=1e-5)
            assert not torch.equal(got[:-1], full[:-1])
            assert torch.allclose(got[:-1], full[:-1], atol=0.05 * float(full.abs().max()))
            # the focus on every head of this layer: the model's adapter itself
            with a.focused(layer, heads=range(H)):
                assert torch.equal(a.attention(layer, x, ctx, True, heads), full)
            # the focus on another layer (or the logits): every head of this one is low precision
            with a.focused(logits=True):
                all_low = lo.attention(layer, x.to(torch.bfloat16), ctx[1], True, heads)
                assert torch.equal(a.attention(layer, x, ctx, True, heads), all_low.float())


def test_mlp_embed_and_unembed(tiny):
    model, mixed = tiny
    a, ex, lo = mixed.adapter, model.adapter, mixed.adapter.shadow
    x = torch.randn(2, 5, a.d_model, generator=torch.Generator().manual_seed(2))
    ids = torch.randint(0, 1000, (2, 5))
    for layer in range(a.n_layers):
        with a.focused(layer, mlp=True):
            assert torch.equal(a.mlp(layer, x), ex.mlp(layer, x))
            other = (layer + 1) % a.n_layers
            assert torch.equal(a.mlp(other, x), lo.mlp(other, x.to(torch.bfloat16)).float())
            # the embedding and the unembedding are full precision in every pass
            assert torch.equal(a.embed(ids), ex.embed(ids)) and torch.equal(a.unembed(x), ex.unembed(x))
            assert a.attn_out_bias(layer) is ex.attn_out_bias(layer) or torch.equal(
                a.attn_out_bias(layer), ex.attn_out_bias(layer))


def test_low_float32_is_the_model(tiny):
    """A float32 'low' copy: any focus gives the model's logits (the harness adds no error of its own)."""
    model, _ = tiny
    same = mixed_precision(model, "float32")
    exact, eng = MaskedModel(model), MaskedModel(same)
    gen = torch.Generator().manual_seed(3)
    clean, corrupted = torch.randint(0, 1000, (2, 6), generator=gen), torch.randint(0, 1000, (2, 6), generator=gen)
    want = exact(clean, corrupted)
    with torch.no_grad(), same.adapter.focused(0, heads=[1]):
        assert torch.allclose(eng(clean, corrupted), want, atol=1e-5)


def test_adapter_without_head_subsets_honours_the_focus(monkeypatch):
    """An adapter that computes every head of a layer at once: the layer is computed both ways and
    each head's row taken from the right one."""
    model = load_model("random:llama-tiny")
    monkeypatch.setattr(model.adapter, "head_subsets", False)
    mixed = mixed_precision(model)
    a = mixed.adapter
    assert not a.head_subsets
    x = torch.randn(a.n_heads + 2 * a.n_kv_heads, 2, 5, a.d_model, generator=torch.Generator().manual_seed(4))
    ctx = a.context(5, None, "cpu")
    with a.focused(1, heads=[2]):
        got = a.attention(1, x, ctx)
    hi = model.adapter.attention(1, x, ctx[0])
    lo = a.shadow.attention(1, x.to(torch.bfloat16), ctx[1]).float()
    assert torch.equal(got[2], hi[2])
    assert torch.equal(got[[0, 1, 3]], lo[[0, 1, 3]])


def test_focus_and_construction_rules(tiny):
    model, mixed = tiny
    a = mixed.adapter
    with pytest.raises(ValueError, match="layer"):
        a.set_focus(a.n_layers)
    with pytest.raises(ValueError, match="heads"):
        a.set_focus(0, heads=[a.n_heads])
    with pytest.raises(ValueError, match="logits"):
        a.set_focus(0, logits=True)
    assert a.focus is None
    with pytest.raises(UserError, match="already"):
        mixed_precision(mixed)
    with pytest.raises(UserError, match="float8 is not implemented"):
        mixed_precision(model, "float8_e4m3fn")
    with pytest.raises(UserError, match="unknown"):
        resolve_low_dtype("int4")
    half = load_model("random:gpt2-tiny", dtype="bfloat16")
    with pytest.raises(UserError, match="wider"):
        mixed_precision(half, "float32")
    # the model's own weights are shared, the copy's are bfloat16
    assert a.exact is model.adapter
    assert all(p.dtype == torch.bfloat16 for p in a.shadow.hf.parameters())
    assert all(p.dtype == torch.float32 for p in model.hf_model.parameters())


# ---- ACDC -------------------------------------------------------------------------------------------
def test_bad_settings_are_user_errors():
    task = SyntheticTask()
    for bad in ({"precision": "fp8"}, {"precision": "pahq", "low_dtype": "float8_e4m3fn"},
                {"precision": "pahq", "low_dtype": "int8"}, {"low_dtype": "float16"}):
        with pytest.raises(UserError):
            ACDC(**bad).config_for(task)
    ACDC(precision="pahq", low_dtype="float16").config_for(task)


def test_cli_rejects_bad_precision_when_planning(tmp_path, capsys):
    from circuitbench.cli import main

    code = main(["run", "--methods", "acdc", "--task", "gt", "--models", "random:gpt2-tiny", "--preset", "smoke",
                 "--set", "acdc.precision=pahq", "--set", "acdc.low_dtype=float8", "--dry-run",
                 "--results", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "float8 is not implemented" in err and len(err.strip().splitlines()) == 1


def test_budget_and_description_name_pahq():
    cfg = {"taus": (0.01,), "batch_size": 32, "trial_batch": 8, "precision": "pahq", "low_dtype": "bfloat16"}
    assert "PAHQ" in ACDC.budget(cfg, 4) and "bfloat16" in ACDC.budget(cfg, 4)
    assert "PAHQ" not in ACDC.budget({**cfg, "precision": "float32"}, 4)
    assert "pahq" in ACDC.description


@pytest.mark.parametrize("name", ["reverse", "xproportion"])
def test_tracr_pahq_finds_the_float32_circuit(name):
    from circuitbench.tasks import get_task

    task = get_task(f"tracr-{name}")
    model = load_model(task.default_model)
    eng = MaskedModel(model)
    train = task.build(model.tokenizer, seed=0, n_train=40).train
    for tau in (1e-3, 1e-2):
        want = _one(ACDC(taus=(tau,), batch_size=40).discover(eng, task, train, None, [], progress=False))
        res = ACDC(taus=(tau,), batch_size=40, precision="pahq").discover(eng, task, train, None, [], progress=False)
        got = _one(res)
        assert torch.equal(got.edges, want.edges) and 0 < got.n_edges < model.graph.n_edges
        assert res.info["precision"] == "pahq" and res.info["low_dtype"] == "bfloat16"


@pytest.mark.parametrize("spec", ["random:gpt2-tiny", "random:llama-tiny"])
def test_pahq_circuits_match_float32(spec):
    """bfloat16 noise in the trials' losses is far below these thresholds: the same circuits; the
    PAHQ circuit's KL (measured in float32) is float32 ACDC's."""
    model = load_model(spec)
    eng = MaskedModel(model)
    task, train = SyntheticTask(), make_examples(8)
    for tau in (1e-4, 1e-3, 1e-2):
        a = ACDC(taus=(tau,)).discover(eng, task, train, None, [], progress=False)
        b = ACDC(taus=(tau,), precision="pahq").discover(eng, task, train, None, [], progress=False)
        ca, cb = _one(a), _one(b)
        overlap = int((ca.edges & cb.edges).sum()) / max(int((ca.edges | cb.edges).sum()), 1)
        assert overlap == 1.0, (tau, overlap)
        ra, rb = a.info["taus"][0], b.info["taus"][0]
        assert rb["kl"] == pytest.approx(ra["kl"], rel=1e-4, abs=1e-7)
        assert rb["trials"] == ra["trials"]
        # the search's own (mixed-precision) loss is close to it, and one baseline per slot with trials
        assert rb["search_kl"] == pytest.approx(ra["kl"], rel=0.05, abs=5e-5)
        assert 1 <= rb["baselines"] <= 2 * model.graph.n_layers + 1
        tried = ~torch.isnan(ca.scores)
        assert torch.equal(tried, ~torch.isnan(cb.scores))
        assert torch.allclose(ca.scores[tried], cb.scores[tried], atol=2e-3)


@pytest.mark.parametrize("spec", ["random:gpt2-tiny", "random:llama-tiny"])
def test_pahq_with_float32_copy_is_float32_acdc(spec):
    """A float32 'low' precision: PAHQ's search (baselines per slot, focus per trial) is float32
    ACDC's, one by one and batched."""
    model = load_model(spec)
    eng = MaskedModel(model)
    task, train = SyntheticTask(), make_examples(8)
    want = _one(ACDC(taus=(3e-3,)).discover(eng, task, train, None, [], progress=False))
    for width in (1, 8):
        got = _one(ACDC(taus=(3e-3,), precision="pahq", low_dtype="float32", trial_batch=width)
                   .discover(eng, task, train, None, [], progress=False))
        assert torch.equal(got.edges, want.edges)
        tried = ~torch.isnan(want.scores)
        assert torch.equal(tried, ~torch.isnan(got.scores))
        assert torch.allclose(got.scores[tried], want.scores[tried], atol=1e-5)


def test_pahq_batched_equals_one_by_one():
    model = load_model("random:llama-tiny")
    eng = MaskedModel(model)
    task, train = SyntheticTask(), make_examples(8)
    runs = [_one(ACDC(taus=(1e-3,), precision="pahq", trial_batch=k).discover(eng, task, train, None, [],
                                                                             progress=False)) for k in (1, 8)]
    assert torch.equal(runs[0].edges, runs[1].edges)


def test_methods_benchmark_reports_pahq():
    from methods.benchmarks import methods_benchmark

    result = methods_benchmark("random:gpt2-tiny", batch=2, seq=5, threads=1, repeats=1, memory=False,
                               progress=False)
    assert result["acdc_pahq_low_dtype"] == ACDC.Config.low_dtype
    assert result["acdc_pahq_batched_trial_over_plain_forward"] > 0 and result["acdc_pahq_over_float32"] > 0
