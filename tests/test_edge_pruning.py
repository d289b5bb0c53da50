"""Edge Pruning: the hard-concrete distribution, reaching a requested sparsity, KL falling while the
sparsity holds, the discretisation rule, the learning-rate schedule, warm starts, determinism and
the presets."""
import math

import pytest
import torch

from circuitbench import MaskedModel, load_model
from circuitbench.circuit import edges_for_sparsity
from circuitbench.errors import UserError
from circuitbench.graph import Graph
from methods.edge_pruning import EdgePruning, EdgePruningConfig, _lr_factor, discretise_masks, warm_log_alpha
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


def _masks(graph, edges: dict, nodes: dict | None = None):
    """Log alphas: the named edges at the given values, every other edge off (-10), writers on (10)."""
    la_edge = torch.full((graph.n_writers, graph.n_readers), -10.0)
    la_node = torch.full((graph.n_writers,), 10.0)
    for name, value in edges.items():
        la_edge[graph.parse_edge(name)] = value
    for name, value in (nodes or {}).items():
        la_node[graph.writer_index[name]] = value
    return la_edge, la_node


def _kept(graph, edges):
    return {graph.edge_name(w, r) for w, r in edges.nonzero().tolist()}


def test_discretisation_keeps_the_mean_deterministic_mask():
    """``deterministic``: round(sum of deterministic masks) edges, the largest ones, where an effective
    edge's mask is deterministic(la_edge) * deterministic(la_node) of its writer; ``density`` counts
    P(z > 0) instead."""
    g, hc = Graph(2, 1), HardConcrete()
    valid = g.valid.float()
    on = ["input->a0.h0<v>", "a0.h0->m0", "m0->logits"]
    # deterministic masks 1.2 sigmoid(x) - 0.1: 0.589, 0.530, 0.470, 0.411, adding up to 2
    graded = {"input->m0": 0.3, "input->a1.h0<q>": 0.1, "input->a1.h0<k>": -0.1, "input->m1": -0.3}
    la_edge, la_node = _masks(g, {**{e: 10.0 for e in on}, **graded})
    det = hc.deterministic(la_edge) * hc.deterministic(la_node)[:, None] * valid
    assert float(det.sum()) == pytest.approx(5.0, abs=1e-4)
    edges, det_out, soft = discretise_masks(hc, la_edge, la_node, valid, "deterministic")
    assert _kept(g, edges) == set(on) | {"input->m0", "input->a1.h0<q>"}
    logsig = torch.nn.functional.logsigmoid
    assert torch.equal(det_out, det) and torch.allclose(soft, logsig(la_edge) + logsig(la_node)[:, None])
    # P(z > 0) of the graded masks is 0.87, 0.85, 0.82, 0.79: the density rule keeps 3 + 3
    edges, _, _ = discretise_masks(hc, la_edge, la_node, valid, "density")
    assert _kept(g, edges) == set(on) | {"input->m0", "input->a1.h0<q>", "input->a1.h0<k>"}
    edges, _, _ = discretise_masks(hc, la_edge, la_node, valid, "exact", n_keep=4)
    assert _kept(g, edges) == set(on) | {"input->m0"}
    # a pruned writer removes its edges from both the count and the circuit
    la_node[g.writer_index["m0"]] = -10.0
    edges, _, _ = discretise_masks(hc, la_edge, la_node, valid, "deterministic")
    assert _kept(g, edges) == {"input->a0.h0<v>", "a0.h0->m0", "input->m0", "input->a1.h0<q>"}
    with pytest.raises(ValueError):
        discretise_masks(hc, la_edge, la_node, valid, "exact")


def test_discretisation_ranks_by_deterministic_mask():
    """The deterministic rule's cut is a threshold on the deterministic masks, not on the soft ones: a
    saturated edge of a half-open writer (deterministic 1 x 0.5, soft 0.990 x 0.5) ranks below an edge
    that is 0.7 open on a 0.7-open writer (deterministic 0.74 x 0.74 = 0.548, soft 0.49). The density
    and exact rules order by soft mask."""
    g, hc = Graph(2, 1), HardConcrete()
    x = math.log(0.7 / 0.3)
    on = ["input->logits", "input->m1", "input->a1.h0<v>"]
    la_edge, la_node = _masks(g, {**{e: 10.0 for e in on}, "a0.h0->m1": 4.6, "m0->m1": x},
                              {"a0.h0": 0.0, "m0": x})
    soft = torch.sigmoid(la_edge) * torch.sigmoid(la_node)[:, None]
    assert soft[g.parse_edge("a0.h0->m1")] > soft[g.parse_edge("m0->m1")]
    valid = g.valid.float()
    edges, _, _ = discretise_masks(hc, la_edge, la_node, valid, "deterministic")  # masks add to 3 + 0.5 + 0.548
    assert _kept(g, edges) == set(on) | {"m0->m1"}
    edges, _, _ = discretise_masks(hc, la_edge, la_node, valid, "exact", n_keep=4)
    assert _kept(g, edges) == set(on) | {"a0.h0->m1"}


def test_discretisation_rules_in_discover(tiny):
    """Masks left at log alpha 0 (deterministic 0.5 on edges and writers, P(z > 0) = 0.83): the
    deterministic rule keeps a quarter of the edges, the density rule 0.83^2 = 69%."""
    model, eng = tiny
    n = model.graph.n_edges
    kw = dict(steps=1, ramp_steps=0, init_log_alpha=0.0, lr=1e-9, lambda_lr=1e-9)
    for rule, share in (("deterministic", 0.25), ("density", 0.832 ** 2)):
        res = EdgePruning(discretise=rule, **kw).discover(eng, SyntheticTask(), make_examples(4), None, [0.5],
                                                          progress=False)
        assert abs(res.circuits[0.5].n_edges - share * n) <= 0.01 * n + 1, rule


def test_learning_rate_schedule():
    warm_decay = _lr_factor(EdgePruningConfig(steps=10, warmup_steps=4, lr_decay=True))
    assert [warm_decay(s) for s in range(10)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6,
                                                                 2 / 6, 1 / 6])
    warm = _lr_factor(EdgePruningConfig(steps=10, warmup_steps=4))
    assert [warm(s) for s in range(10)] == pytest.approx([0.25, 0.5, 0.75] + [1.0] * 7)
    assert [_lr_factor(EdgePruningConfig(steps=4, lr_decay=True))(s) for s in range(4)] == pytest.approx(
        [1.0, 0.75, 0.5, 0.25])


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
    assert (cfg.warmup_steps, cfg.lr_decay, cfg.discretise) == (0, False, "density")
    # the Tracr runs follow the paper's scripts: linear warm-up then linear decay to 0 (its optimiser
    # schedule); reverse on batches of 16 without a node term (the script disables the node loss)
    x = paper.config_for(Named("tracr-xproportion"))
    assert (x.edge_target, x.node_target, x.lr, x.lambda_lr, x.steps, x.batch_size, x.ramp_steps, x.warmup_steps,
            x.lr_decay, x.fix_lambda1) == (0.92, 0.4, 1.0, 1e-4, 720, 16, 640, 96, True, True)
    r = paper.config_for(Named("tracr-reverse"))
    assert (r.edge_target, r.node_target, r.lr, r.lambda_lr, r.steps, r.batch_size, r.ramp_steps, r.warmup_steps,
            r.lr_decay) == (1.02, None, 0.03, 1e-3, 6000, 16, 5900, 1500, True)
    assert x.discretise == r.discretise == "deterministic"  # fixed targets: the circuit the masks keep
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


# ---- the stopping rule and the sparsity path ------------------------------------------------------------
def _rule(**kw):
    from methods.edge_pruning import StoppingRule

    cfg = EdgePruningConfig(**{"stop_window": 5, "stop_tol": 0.05, "stop_sparsity_tol": 0.1, **kw})
    return StoppingRule(cfg, ramp_steps=10)


def test_stopping_rule_fires_after_the_ramp_and_two_quiet_windows():
    rule = _rule()
    fired = [rule.update(1.0, 0.9, 0.9) for _ in range(40)]
    assert fired.index(True) == 10 + 2 * 5 - 1  # step 20: the ramp's 10 steps, then two windows of 5
    assert rule.window_mean() == 1.0


def test_stopping_rule_waits_for_the_kl_and_the_target():
    falling = _rule()
    assert not any(falling.update(0.9 ** i, 0.9, 0.9) for i in range(40))  # KL still falls 10% a window...
    assert _rule(stop_tol=0.5).update  # ...which a looser tolerance accepts:
    loose = _rule(stop_tol=0.5)
    assert any(loose.update(0.9 ** i, 0.9, 0.9) for i in range(40))
    short = _rule()  # density 0.2 against a target density of 0.1: not there yet, however flat the KL
    assert not any(short.update(1.0, 0.8, 0.9) for _ in range(40))
    near = _rule()  # density 0.105 against 0.1: within 10% of it
    assert any(near.update(1.0, 0.895, 0.9) for _ in range(40))


PATH = dict(FAST, steps=200, ramp_steps=80, stage_ramp_steps=20, stop="converged", stop_window=20, stop_tol=0.1)


@pytest.fixture(scope="module")
def path_run(small):
    _, eng = small
    return EdgePruning(schedule="path", **PATH).discover(eng, SyntheticTask(), make_examples(16), None, TARGETS,
                                                         progress=False)


def test_path_emits_every_target_from_one_run(path_run):
    res = path_run
    info = res.info["targets"]
    assert res.info["schedule"] == "path" and sorted(res.circuits) == TARGETS
    assert [info[t]["stage"] for t in TARGETS] == [0, 1]
    # one run: the second stage's steps continue the first's, and the log says where each stage is
    first, second = info[TARGETS[0]], info[TARGETS[1]]
    assert second["run_steps"] == first["run_steps"] + second["steps"]
    steps = [r["step"] for r in res.log]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert {r["stage"] for r in res.log} == {0, 1}
    assert res.cost.backward_passes == second["run_steps"]  # one backward per step
    for t in TARGETS:
        assert info[t]["stop"] in ("converged", "max_steps")
        assert abs(res.circuits[t].sparsity - t) <= 0.03
        row = [r for r in res.log if r["target_sparsity"] == t][-1]
        assert {"kl", "edge_sparsity", "realised_sparsity", "lambda1", "lambda2", "target"} <= set(row)
        assert row["realised_sparsity"] == pytest.approx(res.circuits[t].sparsity)
    # the stopping rule ended at least one stage before its cap
    assert any(info[t]["stop"] == "converged" and info[t]["steps"] < PATH["steps"] for t in TARGETS)


def test_path_is_deterministic(small, path_run):
    _, eng = small
    again = EdgePruning(schedule="path", **PATH).discover(eng, SyntheticTask(), make_examples(16), None,
                                                          list(reversed(TARGETS)), progress=False)
    for t in TARGETS:
        assert torch.equal(again.circuits[t].edges, path_run.circuits[t].edges)


@pytest.mark.parametrize("override, msg", [
    ({"schedule": "zigzag"}, "ep.schedule must be one of independent, path"),
    ({"stop": "soon"}, "ep.stop must be one of none, converged"),
    ({"stop_tol": 0.0}, "must be > 0"),
    ({"stop_tol": -1.0}, "must be > 0"),
    ({"schedule": "path", "lr_decay": True}, "no fixed last step"),
    ({"lambda_beta2": 1.0}, "lambda_beta2 must lie in"),
    ({"lambda_beta2": -0.1}, "lambda_beta2 must lie in"),
])
def test_bad_schedule_and_stop_values(override, msg):
    with pytest.raises(UserError, match=msg):
        EdgePruning(**override).config_for(SyntheticTask())


def test_lambda_beta2_is_the_multipliers_adam_decay(small):
    # the multipliers' first Adam step is lr * sign(gap) whatever beta2; later steps depend on it
    _, eng = small
    cfg = dict(FAST, steps=12, ramp_steps=4, log_every=1, lambda_lr=1.0)
    logs = {b: EdgePruning(lambda_beta2=b, **cfg).discover(eng, SyntheticTask(), make_examples(16), None, [0.7],
                                                            progress=False).log for b in (0.999, 0.5)}
    first = {b: [e["lambda1"] for e in log if e["step"] == 0][0] for b, log in logs.items()}
    last = {b: [e["lambda1"] for e in log][-1] for b, log in logs.items()}
    assert first[0.999] == pytest.approx(first[0.5])
    assert last[0.999] != pytest.approx(last[0.5])


def test_sweep_plans_one_path_job_for_the_whole_grid():
    from circuitbench.sweep import Sweep

    def plan(schedule):
        sweep = Sweep.build(flags={"methods": ["ep"], "tasks": ["ioi-t1"], "models": ["random:gpt2-tiny"],
                                   "sparsities": "0.98,0.9,0.95,0.9", "method_preset": "smoke",
                                   "method_config": {"ep": {"schedule": schedule}}})
        return sweep.plan()[0]

    path = plan("path")
    assert len(path) == 1
    assert path[0].sparsities == (0.9, 0.95, 0.98) and path[0].target_sparsity is None
    assert path[0].config["targets"] == [0.9, 0.95, 0.98]
    independent = plan("independent")
    assert sorted(j.target_sparsity for j in independent) == [0.9, 0.95, 0.98]


def test_node_loss_off_drops_the_node_term(tiny):
    _, eng = tiny
    args = (eng, SyntheticTask(), make_examples(4), None, [0.5])
    kw = dict(steps=4, ramp_steps=2, batch_size=4, node_target=0.3, log_every=1)
    on = EdgePruning(**kw).discover(*args, progress=False)
    off = EdgePruning(node_loss=False, **kw).discover(*args, progress=False)
    assert "node_target" in on.log[-1] and "lambda3" in on.log[-1]
    assert "node_target" not in off.log[-1] and "lambda3" not in off.log[-1]


@pytest.mark.parametrize("value,msg", [("nope", "ep.warm_start: unknown method 'nope'"),
                                       ("ep", "warm-start only from a scoring method")])
def test_bad_warm_start_method_is_refused_before_any_job(value, msg, tmp_path):
    """Issue 15: `--set ep.warm_start=NAME` names a registered scoring method; anything else is one
    line and exit 2 at plan time (a dry run too), not a failed job."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "circuitbench", "run", "--methods", "ep", "--task", "ioi",
                          "--model", "random:gpt2-tiny", "--preset", "smoke", "--set", f"ep.warm_start={value}",
                          "--dry-run", "--results", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in out.stderr
