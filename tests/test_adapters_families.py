"""Adapter features that the random:*-tiny specs of tests/test_engine.py do not switch on.

Sliding-window attention (Qwen2 with ``use_sliding_window``: the layers from ``max_window_layers``
on; Mistral: every layer) against the Hugging Face model with a window shorter than the sequence:

- the window matters (the engine without it gives other logits);
- all masks 1 = the model's logits, also with left and right padding; all masks 0 = the corrupted
  run's logits;
- one edge removed = the hand-written hook patch of tests/test_engine.py, for q, k, v, MLP and
  logits readers of the windowed layer.

Qwen2 and the other families themselves are covered by tests/test_engine.py's spec lists.
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
