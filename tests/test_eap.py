"""EAP and mask-space IG (eap-mask-ig) against brute force: every edge's score equals a finite-difference
estimate of the objective's change computed edge by edge; eap-mask-ig's scores add up to the
corrupted-minus-clean metric. EAP-IG proper (eap-ig, eap-ig-act): tests/test_eap_ig.py."""
import pytest
import torch

from circuitbench import MaskedModel, load_model
from methods.eap import EAP, EAPMaskIG
from methods_support import SyntheticTask, make_examples


@pytest.fixture(scope="module", params=["random:gpt2-tiny", "random:llama-tiny"])
def tiny64(request):
    model = load_model(request.param, dtype=torch.float64)
    return model, MaskedModel(model)


def _objective(eng, task, train, mask):
    with torch.no_grad():
        out = eng(train.clean, train.corrupted, attention_mask=train.attention_mask, edge_mask=mask,
                  positions=train.positions, ablation=task.ablation)
        return float(task.objective(out, train).sum())


@pytest.mark.parametrize("ablation", ["interchange", "zero"])
def test_eap_scores_equal_edge_by_edge_finite_differences(tiny64, ablation):
    model, eng = tiny64
    g = model.graph
    task, train = SyntheticTask(ablation), make_examples(6)
    res = EAP(batch_size=4).discover(eng, task, train, None, [], progress=False)
    # GPT-2 runs wholly in float64; Llama's RMSNorm computes in float32 inside transformers, so its
    # finite differences need a larger step and a looser tolerance.
    exact = model.family == "gpt2"
    h, rtol, atol = (1e-5, 1e-5, 1e-7) if exact else (1e-2, 2e-3, 1e-3)
    ones = g.full_mask(torch.float64)
    brute = torch.zeros(g.n_writers, g.n_readers, dtype=torch.float64)
    for i, j in g.edge_index.tolist():
        up, down = ones.clone(), ones.clone()
        up[i, j] += h
        down[i, j] -= h
        # score = -(d objective / d z): the first-order change when the edge is corrupted
        brute[i, j] = -(_objective(eng, task, train, up) - _objective(eng, task, train, down)) / (2 * h)
    assert torch.allclose(res.scores.double(), brute, rtol=rtol, atol=atol * float(brute.abs().max()))
    assert (res.scores[~g.valid] == 0).all()
    assert res.cost.forward_passes >= 2 and res.cost.backward_passes == 2  # one fwd+bwd per batch


def test_eap_mask_ig_scores_add_up_to_the_metric_difference(tiny64):
    model, eng = tiny64
    g = model.graph
    task, train = SyntheticTask(), make_examples(6)
    res = EAPMaskIG(steps=64).discover(eng, task, train, None, [], progress=False)
    clean = _objective(eng, task, train, g.full_mask(torch.float64))
    corrupted = _objective(eng, task, train, torch.zeros_like(g.full_mask(torch.float64)))
    total = float(res.scores.double().sum())
    assert abs(total - (corrupted - clean)) <= 1e-3 * abs(corrupted - clean)


def test_eap_mask_ig_with_one_step_at_the_midpoint_is_eap_at_half(tiny64):
    """One point on the path is the gradient at masks 1/2: checks the path points are where they
    are documented to be."""
    model, eng = tiny64
    g = model.graph
    task, train = SyntheticTask(), make_examples(4)
    res = EAPMaskIG(steps=1).discover(eng, task, train, None, [], progress=False)
    mask = (g.full_mask(torch.float64) * 0.5).requires_grad_(True)
    out = eng(train.clean, train.corrupted, attention_mask=train.attention_mask, edge_mask=mask,
              positions=train.positions)
    (grad,) = torch.autograd.grad(task.objective(out, train).sum(), mask)
    assert torch.allclose(res.scores.double(), -grad * g.valid, rtol=1e-6, atol=1e-9)
