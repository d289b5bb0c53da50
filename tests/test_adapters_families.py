"""Adapter features that the random:*-tiny specs of tests/test_engine.py do not switch on.

Sliding-window attention (Qwen2 with ``use_sliding_window``: the layers from ``max_window_layers``
on; Mistral: every layer) against the Hugging Face model with a window shorter than the sequence:

- the window matters (the engine without it gives other logits);
- all masks 1 = the model's logits, also with left and right padding; all masks 0 = the corrupted
  run's logits;
- one edge removed = the hand-written hook patch of tests/test_engine.py, for q, k, v, MLP and
  logits readers of the windowed layer.

Qwen2 and the other families themselves are covered by tests/test_engine.py's spec lists.

Gemma 2 and Gemma 3: every feature the random:gemma*-tiny specs switch on matters (soft-capping,
windows, q/k norms, drawn norm weights); the per-head outputs add up to the layer's post-normed
attention output; padding under the window; a multimodal Gemma 3 checkpoint's text part.
"""
import pytest
import torch
import transformers

from circuitbench import MaskedModel
from circuitbench.models import LoadedModel, _adapter_for, _freeze
from test_engine import _batch, _Patcher, _readers_to_test

SMALL = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
             intermediate_size=128, vocab_size=1000, max_position_embeddings=64,
             tie_word_embeddings=False, initializer_range=0.1)
WINDOWED = {
    # layer 0 full attention, layer 1 a window of 3 tokens
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(use_sliding_window=True, sliding_window=3, max_window_layers=1), [None, 3]),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=3), [3, 3]),
}


@pytest.fixture(scope="module", params=sorted(WINDOWED))
def windowed(request):
    config, cls, extra, windows = WINDOWED[request.param]
    cfg = getattr(transformers, config)(**SMALL, **extra)
    torch.manual_seed(0)
    hf = getattr(transformers, cls)(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("_proj.bias"):
                p.normal_(0.0, 0.1)
    hf = _freeze(hf, torch.device("cpu"), torch.float32)
    model = LoadedModel(f"windowed:{request.param}", _adapter_for(hf), hf)
    assert model.adapter.windows == windows
    return model


def test_window_matters_and_all_ones_reproduce_model(windowed):
    clean, corrupted = _batch()
    mm = MaskedModel(windowed)
    want = windowed.hf_model(clean).logits
    assert (mm(clean, corrupted) - want).abs().max().item() <= 1e-4
    windows = windowed.adapter.windows
    try:
        windowed.adapter.windows = [None] * len(windows)
        unwindowed = mm(clean, corrupted)
    finally:
        windowed.adapter.windows = windows
    assert (unwindowed - want).abs().max().item() > 1e-3


def test_all_zeros_reproduce_corrupted_run(windowed):
    clean, corrupted = _batch(1)
    g = windowed.graph
    got = MaskedModel(windowed)(clean, corrupted, edge_mask=torch.zeros(g.n_writers, g.n_readers))
    assert (got - windowed.hf_model(corrupted).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_under_the_window(windowed, side):
    clean, corrupted = _batch(2, B=2, S=7)
    mask = torch.ones(2, 7, dtype=torch.long)
    if side == "left":
        mask[0, :2] = 0
    else:
        mask[0, 5:] = 0
    got = MaskedModel(windowed)(clean, corrupted, attention_mask=mask)
    want = windowed.hf_model(clean, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("ablation", ["interchange", "zero"])
def test_one_edge_removed_equals_activation_patch(windowed, ablation):
    g = windowed.graph
    clean, corrupted = _batch(4)
    mm = MaskedModel(windowed)
    patcher = _Patcher(windowed)
    clean_out, corr_out = patcher.writer_outputs(clean), patcher.writer_outputs(corrupted)
    full = windowed.hf_model(clean).logits
    for reader in _readers_to_test(g):  # the last layer's readers: windowed in both models
        for writer in ["input", "a0.h2", "m0"]:
            w, r = g.parse_edge(f"{writer}->{reader}")
            delta = clean_out[writer] - (corr_out[writer] if ablation == "interchange" else 0)
            want = patcher.patched_logits(clean, reader, delta)
            mask = g.full_mask()
            mask[w, r] = 0
            got = mm(clean, corrupted, edge_mask=mask, ablation=ablation)
            assert (want - full).abs().max() > 1e-3, (writer, reader)
            assert (got - want).abs().max().item() <= 1e-4, (writer, reader, ablation)


# ---- Gemma 2 and Gemma 3 (tests/test_engine.py runs the exactness suite on random:gemma*-tiny) ----

GEMMA = ["random:gemma2-tiny", "random:gemma3-tiny"]


@pytest.fixture(scope="module", params=GEMMA)
def gemma(request):
    from circuitbench import load_model
    return load_model(request.param)


def test_gemma_features_are_exercised(gemma):
    """Each Gemma feature the tiny specs switch on changes the logits: switched off in the adapter,
    the engine no longer reproduces the model (so the exactness tests check every one of them)."""
    a = gemma.adapter
    clean, corrupted = _batch()
    mm = MaskedModel(gemma)
    want = gemma.hf_model(clean).logits
    assert (mm(clean, corrupted) - want).abs().max().item() <= 1e-4
    switches = {"windows": [None] * a.n_layers}
    if a.family == "gemma2":
        switches.update(softcap=None, final_softcap=None)
    else:
        switches.update(qk_norm=False)
    for name, off in switches.items():
        on = getattr(a, name)
        try:
            setattr(a, name, off)
            assert (mm(clean, corrupted) - want).abs().max().item() > 1e-3, name
        finally:
            setattr(a, name, on)
    assert any(w is not None and w < clean.shape[1] for w in a.windows)
    norms = [m.weight for n, m in gemma.hf_model.named_modules() if n.endswith("norm")]
    assert norms and all(w.abs().max() > 0 for w in norms)  # drawn, not transformers' w = 0


def test_gemma_head_outputs_add_up_to_the_post_normed_attention(gemma):
    """The per-head writer outputs (each head's share of the normed sum) add up to the layer's
    post-attention-norm output as the Hugging Face layer computes it (taken with a hook)."""
    a, hf = gemma.adapter, gemma.hf_model
    clean, _ = _batch(1)
    seen = {}
    hook = hf.model.layers[1].post_attention_layernorm.register_forward_hook(
        lambda mod, args, out: seen.__setitem__("out", out))
    captured = {}
    pre = hf.model.layers[1].input_layernorm.register_forward_pre_hook(
        lambda mod, args: captured.__setitem__("x", args[0]))
    try:
        with torch.no_grad():
            hf(clean)
    finally:
        hook.remove()
        pre.remove()
    ctx = a.context(clean.shape[1], None, clean.device)
    with torch.no_grad():
        shares = a.attention(1, captured["x"][None], ctx, per_head=True)
        summed = a.attention(1, captured["x"][None], ctx, per_head=False)
    assert shares.shape[0] == a.n_heads
    assert (shares.sum(0) - seen["out"]).abs().max().item() <= 1e-5
    assert (summed - seen["out"]).abs().max().item() <= 1e-5
    assert a.head_subsets is False
    with pytest.raises(ValueError, match="every head"):
        a.attention(1, captured["x"][None], ctx, heads=torch.tensor([0]))


@pytest.mark.parametrize("side", ["left", "right"])
def test_gemma_padding(gemma, side):
    clean, corrupted = _batch(2, B=2, S=7)
    mask = torch.ones(2, 7, dtype=torch.long)
    if side == "left":
        mask[0, :2] = 0
    else:
        mask[0, 5:] = 0
    got = MaskedModel(gemma)(clean, corrupted, attention_mask=mask)
    want = gemma.hf_model(clean, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real] - want[real]).abs().max().item() <= 1e-4


def test_gemma3_multimodal_text_part():
    """A multimodal Gemma 3 checkpoint (model type gemma3, Gemma3ForConditionalGeneration) runs on
    its language model: all masks 1 = the model's text-only logits, all masks 0 = the corrupted run."""
    text = dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64, head_dim=24,
                intermediate_size=128, vocab_size=1000, max_position_embeddings=64, query_pre_attn_scalar=32,
                sliding_window=3, layer_types=["sliding_attention", "full_attention"], initializer_range=0.1)
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    boi_token_index=997, eoi_token_index=998, image_token_index=1000)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") and "language_model" in name:
                p.normal_(0.0, 0.1)
    hf = _freeze(hf, torch.device("cpu"), torch.float32)
    model = LoadedModel("multimodal:gemma3", _adapter_for(hf), hf)
    assert model.adapter.multimodal and model.family == "gemma3"
    assert (model.graph.n_layers, model.graph.n_heads, model.graph.kv_heads) == (2, 4, 2)
    clean, corrupted = _batch(3)
    mm, g = MaskedModel(model), model.graph
    with torch.no_grad():
        assert (mm(clean, corrupted) - hf(clean).logits).abs().max().item() <= 1e-4
        zeros = torch.zeros(g.n_writers, g.n_readers)
        assert (mm(clean, corrupted, edge_mask=zeros) - hf(corrupted).logits).abs().max().item() <= 1e-4
