"""Edge Pruning: the hard-concrete distribution, reaching a requested sparsity, KL falling while the
sparsity holds, exact discretisation, warm starts, determinism and the presets."""
import math

import pytest
import torch

from circuitbench import MaskedModel, load_model
from circuitbench.circuit import edges_for_sparsity
from circuitbench.errors import UserError
from methods.edge_pruning import EdgePruning, warm_log_alpha
from methods.hard_concrete import HardConcrete
from methods_support import SyntheticTask, make_examples, small_gpt2

# A test-sized schedule: the paper's masks start at log alpha 10 and move at learning rate 0.8 over
# 3,000 steps; a 300-step run converges with gentler steps from a lower start.
FAST = dict(steps=300, ramp_steps=100, batch_size=8, lr=0.1, lambda_lr=0.1, init_log_alpha=3.0, log_every=10)
TARGETS = [0.5, 0.7]


@pytest.fixture(scope="module")
def small():
    model = small_gpt2()  # 4 layers x 8 heads: 1,519 edges, so 1 point of sparsity is 15 edges
    return model, MaskedModel(model)


@pytest.fixture(scope="module")
def tiny():
    model = load_model("random:gpt2-tiny")
    return model, MaskedModel(model)


@pytest.fixture(scope="module")
def trained(small):
    model, eng = small
    res = EdgePruning(**FAST).discover(eng, SyntheticTask(), make_examples(16), None, TARGETS, progress=False)
    return model, res


def test_hard_concrete_matches_its_formulas():
    hc = HardConcrete()
    la = torch.tensor([-3.0, -0.5, 0.0, 1.0, 4.0])
    gen = torch.Generator().manual_seed(0)
    z = hc.sample(la[:, None].expand(-1, 200_000), gen)
    assert z.min() == 0.0 and z.max() == 1.0  # exact zeros and ones occur
    freq = (z > 0).double().mean(1)
    assert torch.allclose(freq, hc.prob_nonzero(la).double(), atol=4e-3)
    want = torch.sigmoid(la - (2 / 3) * math.log(0.1 / 1.1))
    assert torch.allclose(hc.prob_nonzero(la), want)
    assert torch.allclose(hc.deterministic(la), (torch.sigmoid(la) * 1.2 - 0.1).clamp(0, 1))
    with pytest.raises(ValueError):
        HardConcrete(left=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_reaches_the_requested_sparsity(trained, target):
    model, res = trained
    circuit = res.circuits[target]
    assert abs(circuit.sparsity - target) <= 0.01
    assert res.info["targets"][target]["realised_sparsity"] == circuit.sparsity
    assert circuit.meta["realised_sparsity"] == circuit.sparsity


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_kl_falls_during_training(trained, target):
    _, res = trained
    # after the ramp the target holds still; the KL (one sampled mask, one batch per row) falls
    held = [r for r in res.log if r["target_sparsity"] == target and r["step"] >= FAST["ramp_steps"]]
    early = sum(r["kl"] for r in held[:5]) / 5
    late = sum(r["kl"] for r in held[-5:]) / 5
    assert late < 0.6 * early
    assert all(abs(r["edge_sparsity"] - target) < 0.01 for r in held[-5:])


def test_exact_discretisation_keeps_the_requested_edge_count(tiny):
    model, eng = tiny
    res = EdgePruning(preset="smoke", discretise="exact").discover(
        eng, SyntheticTask(), make_examples(8), None, [0.3, 0.8], progress=False)
    for s, circuit in res.circuits.items():
        assert circuit.n_edges == edges_for_sparsity(model.graph, s)


def test_same_seed_same_circuit(tiny):
    _, eng = tiny
    task, train = SyntheticTask(), make_examples(8)
    kw = dict(steps=30, ramp_steps=20, batch_size=4)
    a = EdgePruning(**kw).discover(eng, task, train, None, [0.7], seed=3, progress=False)
    b = EdgePruning(**kw).discover(eng, task, train, None, [0.7], seed=3, progress=False)
    c = EdgePruning(**kw).discover(eng, task, train, None, [0.7], seed=4, progress=False)
    assert torch.equal(a.circuits[0.7].edges, b.circuits[0.7].edges)
    assert a.log == b.log
    assert a.log != c.log


def test_circuit_excludes_edges_of_pruned_writers(tiny):
    """An edge counts only when its writer node is kept too: with every node off, nothing is kept."""
    _, eng = tiny
    res = EdgePruning(steps=1, ramp_steps=0, init_log_alpha=-10.0, lr=1e-9, lambda_lr=1e-9).discover(
        eng, SyntheticTask(), make_examples(4), None, [0.0], progress=False)
    assert res.circuits[0.0].n_edges == 0


def test_warm_start_from_scores_and_from_a_method(tiny):
    model, eng = tiny
    g = model.graph
    scores = torch.rand(g.n_writers, g.n_readers, generator=torch.Generator().manual_seed(0))
    la = warm_log_alpha(scores, g, 0.75, 3.0)
    valid = g.valid
    top = scores.masked_fill(~valid, -1).flatten().argsort(descending=True)[: g.n_edges // 4]
    assert (la.flatten()[top] > 0).all()
    assert int((la[valid] > 0).sum()) == g.n_edges - round(0.75 * g.n_edges)
    res = EdgePruning(steps=2, ramp_steps=0, batch_size=4, warm_start="eap").discover(
        eng, SyntheticTask(), make_examples(4), None, [0.75], progress=False)
    assert res.info["warm_start"] == "eap" and "warm_start" in res.cost.wall_s
    with pytest.raises(UserError):
        EdgePruning(warm_start="ep").discover(eng, SyntheticTask(), make_examples(4), None, [0.5], progress=False)
    with pytest.raises(UserError):
        EdgePruning(warm_start=torch.zeros(3, 3)).discover(eng, SyntheticTask(), make_examples(4), None, [0.5],
                                                             progress=False)


def test_presets_follow_the_paper():
    class Named:
        def __init__(self, name):
            self.name = name

    paper = EdgePruning(preset="paper")
    cfg = paper.config
    assert (cfg.steps, cfg.batch_size, cfg.ramp_steps, cfg.lr, cfg.lambda_lr) == (3000, 32, 2500, 0.8, 0.8)
    assert (cfg.beta, cfg.left, cfg.right, cfg.eps) == (2 / 3, -0.1, 1.1, 1e-6)
    assert paper.config_for(Named("ioi")).node_target == 0.72
    assert paper.config_for(Named("gt")).node_target == 0.68
    assert paper.config_for(Named("gp")).node_target == 0.69
    assert paper.config_for(Named("ioi-t1")).lr == 1.0
    x = paper.config_for(Named("tracr-xproportion"))
    assert (x.edge_target, x.node_target, x.lr, x.lambda_lr, x.steps, x.batch_size, x.ramp_steps, x.fix_lambda1) == (
        0.92, 0.4, 1.0, 1e-4, 720, 16, 640, True)
    r = paper.config_for(Named("tracr-reverse"))
    assert (r.edge_target, r.node_target, r.lr, r.lambda_lr, r.steps, r.ramp_steps, r.warmup_steps) == (
        1.02, 0.1, 0.03, 1e-3, 6000, 5900, 1500)
    # explicit overrides win over the preset's per-task entries
    assert EdgePruning(preset="paper", node_target=0.5).config_for(Named("ioi")).node_target == 0.5
    # quick and smoke change budgets only
    for name in ("quick", "smoke"):
        c = EdgePruning(preset=name).config
        assert (c.lr, c.lambda_lr, c.beta, c.init_log_alpha) == (cfg.lr, cfg.lambda_lr, cfg.beta, cfg.init_log_alpha)
        assert c.steps < cfg.steps


def test_fixed_training_target_serves_every_requested_sparsity(tiny):
    _, eng = tiny
    res = EdgePruning(steps=3, ramp_steps=0, batch_size=4, edge_target=0.9).discover(
        eng, SyntheticTask(), make_examples(4), None, [0.5, 0.6], progress=False)
    assert res.circuits[0.5] is res.circuits[0.6]
    assert res.info["targets"][0.5]["train_target"] == 0.9
    assert res.cost.forward_passes >= 3 and res.cost.backward_passes == 3  # trained once


def test_bad_settings_are_user_errors(tiny):
    _, eng = tiny
    for kw in (dict(discretise="round"), dict(steps=0), dict(node_target=3.0)):
        with pytest.raises(UserError):
            EdgePruning(**kw).discover(eng, SyntheticTask(), make_examples(4), None, [0.5], progress=False)
    with pytest.raises(UserError):
        EdgePruning().discover(eng, SyntheticTask(), make_examples(4), None, [1.5], progress=False)
