"""The evaluator on a tiny random model: reference points, hand-computed metrics, CLI."""
import json

import pytest
import torch

import circuitbench
from circuitbench.circuit import Circuit
from circuitbench.cli import main
from circuitbench.errors import UserError
from circuitbench.evaluate import evaluate, format_table
from circuitbench.tasks import get_task

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    return circuitbench.load_model("random:gpt2-tiny")


def hf_logits(model, ids, mask, positions):
    """The transformers model's own logits at the scored positions: [B, P, V]."""
    with torch.no_grad():
        out = model.hf_model(input_ids=ids, attention_mask=mask).logits
    return out.gather(1, positions.unsqueeze(-1).expand(-1, -1, out.shape[-1]))


def test_full_circuit_has_zero_kl_and_exact_match(model):
    for name in ("ioi-t1", "gt"):
        values = evaluate(model, get_task(name), "full", limit=24, progress=False)
        assert values["kl"] == pytest.approx(0.0, abs=1e-5)
        assert values["exact_match"] == 1.0
        assert values["n_examples"] == 24


def test_metrics_match_a_hand_computation(model):
    task = get_task("ioi-t1")
    ex = task.build(model.tokenizer).test
    full = hf_logits(model, ex.clean, ex.attention_mask, ex.positions)[:, 0]
    empty = hf_logits(model, ex.corrupted, ex.attention_mask, ex.positions)[:, 0]
    rows = torch.arange(len(ex))
    a, w = ex.targets["answer"], ex.targets["wrong"]
    lp_full, lp_empty = full.log_softmax(-1), empty.log_softmax(-1)
    logit_diff = (lp_full[rows, a] - lp_full[rows, w]).mean().item()
    accuracy = (full[rows, a] > full[rows, w]).float().mean().item()
    kl_empty = (lp_full.exp() * (lp_full - lp_empty)).sum(-1).mean().item()
    match_empty = (full.argmax(-1) == empty.argmax(-1)).float().mean().item()

    values = evaluate(model, task, "full", batch_size=16, progress=False, references=True)
    assert values["logit_diff"] == pytest.approx(logit_diff, abs=1e-4)
    assert values["full/logit_diff"] == pytest.approx(logit_diff, abs=1e-4)
    assert values["accuracy"] == pytest.approx(accuracy)
    # The empty circuit is the corrupted run: every reader sees the corrupted activations.
    assert values["empty/kl"] == pytest.approx(kl_empty, rel=1e-3, abs=1e-6)
    assert values["empty/exact_match"] == pytest.approx(match_empty)
    assert values["empty/logit_diff"] == pytest.approx((lp_empty[rows, a] - lp_empty[rows, w]).mean().item(), abs=1e-4)
    empty = evaluate(model, task, "empty", batch_size=16, progress=False)
    assert empty["kl"] == pytest.approx(kl_empty, rel=1e-3, abs=1e-6)


def test_greater_than_metrics_match_a_hand_computation(model):
    stats = pytest.importorskip("scipy.stats")
    task = get_task("gt")
    ex = task.build(model.tokenizer).split("test").select(slice(0, 20))
    full = hf_logits(model, ex.clean, ex.attention_mask, ex.positions)[:, 0]
    empty = hf_logits(model, ex.corrupted, ex.attention_mask, ex.positions)[:, 0]
    digits = ex.targets["answer_ids"][0]
    p = full[:, digits].softmax(-1)
    q = empty[:, digits].softmax(-1)
    prob_diff, prob_diff_10, taus, kls = [], [], [], []
    for i in range(len(ex)):
        t = int(ex.targets["threshold"][i])
        prob_diff.append(p[i, t + 1:].sum().item() - p[i, :t].sum().item())
        prob_diff_10.append(p[i, t + 1:t + 2].sum().item() - p[i, max(t - 1, 0):t].sum().item())
        taus.append(stats.kendalltau(p[i].numpy(), q[i].numpy()).statistic)
        kls.append((p[i] * (p[i].log() - q[i].log())).sum().item())
    values = evaluate(model, task, "empty", progress=False, references=True, examples=ex)
    assert values["full/prob_diff"] == pytest.approx(sum(prob_diff) / 20, abs=1e-5)
    assert values["full/prob_diff_10"] == pytest.approx(sum(prob_diff_10) / 20, abs=1e-5)
    assert values["kendall_tau"] == pytest.approx(sum(taus) / 20, abs=1e-5)
    assert values["kl"] == pytest.approx(sum(kls) / 20, rel=1e-3, abs=1e-7)
    assert values["full/kendall_tau"] == pytest.approx(1.0)


def test_batch_size_does_not_change_results(model, tmp_path):
    graph = model.graph
    scores = torch.rand(graph.n_writers, graph.n_readers, generator=torch.Generator().manual_seed(0))
    circuit = Circuit.from_scores(graph, scores, graph.n_edges // 2)
    task = get_task("gp")
    a = evaluate(model, task, circuit, batch_size=5, limit=30, progress=False)
    b = evaluate(model, task, circuit, batch_size=32, limit=30, progress=False)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-5)
    assert 0 < a["kl"] and a["exact_match"] < 1
    path = tmp_path / "circuit.json"
    circuit.save(path)
    c = evaluate(model, task, str(path), batch_size=32, limit=30, progress=False)
    assert c == pytest.approx(b)


def test_evaluate_errors(model):
    task = get_task("ioi-t1")
    with pytest.raises(UserError, match="unknown split"):
        evaluate(model, task, "full", split="dev", progress=False)
    with pytest.raises(UserError, match="limit"):
        evaluate(model, task, "full", limit=0, progress=False)
    other = circuitbench.load_model("random:llama-tiny")
    with pytest.raises(UserError, match="graph"):
        evaluate(model, task, Circuit.full(other.graph), progress=False)


def test_format_table():
    text = format_table({"kl": 0.5, "full/kl": 0.0, "empty/kl": 1.25}, ("kl",))
    assert "full model" in text and "empty circuit" in text and "1.2500" in text


# ---- commands ----------------------------------------------------------------------------------------
def test_cli_evaluate_json(capsys):
    code = main(["evaluate", "--task", "ioi-t1", "--model", "random:gpt2-tiny", "--circuit", "full",
                 "--limit", "16", "--json", "--no-progress"])
    assert code == 0
    values = json.loads(capsys.readouterr().out)
    assert values["kl"] == pytest.approx(0.0, abs=1e-5) and values["exact_match"] == 1.0
    assert values["empty/kl"] > 0 and values["n_examples"] == 16


def test_cli_evaluate_table(capsys):
    code = main(["evaluate", "--task", "gt", "--model", "random:gpt2-tiny", "--circuit", "empty",
                 "--limit", "8", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "prob_diff_10" in out and "kendall_tau" in out and "empty circuit" in out


def test_cli_tasks_list_and_show(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in ("ioi", "ioi-t1", "gt", "gp", "boolexpr-ip", "boolexpr-fs", "custom:PATH"):
        assert name in out
    assert "36084" in out
    assert main(["tasks", "show", "ioi-t1", "--model", "random:gpt2-tiny"]) == 0
    out = capsys.readouterr().out
    assert out.count("test example") == 3 and "dropped 0" in out
    assert main(["tasks", "show", "gt", "--model", "random:gpt2-tiny", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["variant"] == "first-digit" and len(shown["examples"]) == 3
    assert set(shown["dropped"]) == {"train", "validation", "test"}


def test_cli_user_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean": "a", "corrupted": "b", "answer": " c", "wrong_answer": " d"}\n{oops\n')
    assert main(["tasks", "show", f"custom:{bad}", "--model", "random:gpt2-tiny"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2:" in err and "Traceback" not in err
    assert main(["evaluate", "--task", "nope", "--model", "random:gpt2-tiny", "--circuit", "full"]) == 2
    assert "unknown task" in capsys.readouterr().err
    assert main(["evaluate", "--task", "ioi-t1", "--model", "random:gpt2-tiny",
                 "--circuit", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_evaluate_many_equals_one_circuit_at_a_time():
    """Several circuits scored together share each batch's reference and corrupted passes and get
    exactly the values each gets alone."""
    import torch

    from circuitbench import load_model
    from circuitbench.circuit import Circuit
    from circuitbench.evaluate import evaluate, evaluate_many

    model = load_model("random:gpt2-tiny")
    g = model.graph
    scores = torch.rand(g.n_writers, g.n_readers, generator=torch.Generator().manual_seed(0))
    circuits = {s: Circuit.from_sparsity(g, scores, s) for s in (0.5, 0.9)}
    circuits["empty"] = Circuit.empty(g)
    together = evaluate_many(model, "ioi-t1", circuits, limit=20, batch_size=8, progress=False, references=True)
    for key, circuit in circuits.items():
        alone = evaluate(model, "ioi-t1", circuit, limit=20, batch_size=8, progress=False, references=True)
        got = dict(together[key])
        assert got.pop("eval_s") > 0
        assert got == alone
