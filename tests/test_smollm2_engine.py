"""The engine on the real embedded model: all masks 1 = its own logits, all masks 0 = the corrupted run."""
import torch

from circuitbench import MaskedModel, load_model


def test_smollm2_masks_reproduce_model_and_corrupted_run():
    model = load_model("smollm2-135m")
    g = model.graph
    assert (g.n_layers, g.n_heads, g.kv_heads) == (30, 9, 3)
    tok = model.tokenizer
    clean = tok(["When Mary and John went to the store, John gave a drink to"], return_tensors="pt").input_ids
    corrupted = tok(["When Anna and Paul went to the shop, Paul gave a drink to"], return_tensors="pt").input_ids
    assert clean.shape == corrupted.shape
    mm = MaskedModel(model)
    with torch.no_grad():
        full = model.hf_model(clean).logits
        corr = model.hf_model(corrupted).logits
        got = mm(clean, corrupted)
        assert (got - full).abs().max().item() <= 1e-3
        got0 = mm(clean, corrupted, edge_mask=torch.zeros(g.n_writers, g.n_readers))
        assert (got0 - corr).abs().max().item() <= 1e-3
    # the real model does the task: " Mary" is its top prediction
    assert tok.decode(got[0, -1].argmax()) == " Mary"
