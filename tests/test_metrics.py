"""Metrics checked against values computed by hand."""
import math

import pytest
import torch

from circuitbench import metrics


def logits_of(*probs):
    """Logits whose softmax is exactly ``probs`` (one row per argument), shaped [B, 1, V]."""
    return torch.tensor(probs, dtype=torch.float64).log().float().unsqueeze(1)


def test_kl_divergence_by_hand():
    full = logits_of([0.5, 0.25, 0.25])
    circuit = logits_of([0.25, 0.25, 0.5])
    # 0.5 ln(0.5/0.25) + 0.25 ln 1 + 0.25 ln(0.25/0.5) = 0.25 ln 2
    kl = metrics.kl_divergence(full, circuit)
    assert kl.shape == (1,)
    assert kl.item() == pytest.approx(0.25 * math.log(2), abs=1e-6)
    assert metrics.kl_divergence(full, full).item() == pytest.approx(0.0, abs=1e-7)


def test_kl_divergence_restricted_renormalises():
    # Over tokens {0, 2} only: full (0.5, 0.25) -> (2/3, 1/3); circuit (0.25, 0.5) -> (1/3, 2/3).
    full = logits_of([0.5, 0.25, 0.25])
    circuit = logits_of([0.25, 0.25, 0.5])
    kl = metrics.kl_divergence(full, circuit, restrict=torch.tensor([0, 2]))
    expected = 2 / 3 * math.log(2) + 1 / 3 * math.log(0.5)
    assert kl.item() == pytest.approx(expected, abs=1e-6)


def test_kl_divergence_mean_over_positions():
    full = torch.cat([logits_of([0.5, 0.25, 0.25]), logits_of([0.5, 0.25, 0.25])], dim=1)
    circuit = torch.cat([logits_of([0.25, 0.25, 0.5]), logits_of([0.5, 0.25, 0.25])], dim=1)
    assert metrics.kl_divergence(full, circuit).item() == pytest.approx(0.125 * math.log(2), abs=1e-6)


def test_logit_difference_and_accuracy_by_hand():
    logits = torch.tensor([[[1.0, 3.0, -2.0]], [[0.5, 0.0, 4.0]]])
    correct = torch.tensor([1, 0])
    wrong = torch.tensor([0, 2])
    # log P(correct) - log P(wrong) = raw logit difference: 3-1 = 2, 0.5-4 = -3.5
    assert metrics.logit_difference(logits, correct, wrong).tolist() == pytest.approx([2.0, -3.5])
    assert metrics.accuracy(logits, correct, wrong).tolist() == [1.0, 0.0]
    # Same through log-probabilities, the definition in the issue.
    logp = torch.log_softmax(logits, -1)
    assert (logp[0, 0, 1] - logp[0, 0, 0]).item() == pytest.approx(2.0, abs=1e-6)


def test_exact_match():
    full = torch.tensor([[[1.0, 3.0, -2.0]], [[0.5, 0.0, 4.0]]])
    circuit = torch.tensor([[[0.0, 2.0, 1.0]], [[5.0, 0.0, 4.0]]])
    assert metrics.exact_match(full, circuit).tolist() == [1.0, 0.0]
    # Restricted to tokens {0, 2}: row 0 full argmax 0, circuit argmax 2 -> miss; row 1 full 2, circuit 0 -> miss
    assert metrics.exact_match(full, circuit, restrict=torch.tensor([0, 2])).tolist() == [0.0, 0.0]
    assert metrics.exact_match(full, full).tolist() == [1.0, 1.0]


def test_probability_difference_by_hand():
    probs = [0.1, 0.2, 0.3, 0.15, 0.25]
    # Tokens 10..14 stand for answer values 0..4; other vocabulary entries must not count.
    logits = torch.full((1, 1, 20), -1e4)
    logits[0, 0, 10:15] = torch.tensor(probs).log()
    logits[0, 0, 3] = 5.0  # a huge non-answer logit is removed by the restriction
    answers = torch.arange(10, 15)
    t = torch.tensor([2])
    assert metrics.probability_difference(logits, answers, t).item() == pytest.approx(0.4 - 0.3, abs=1e-6)
    assert metrics.probability_difference(logits, answers, t, window=1).item() == pytest.approx(0.15 - 0.2, abs=1e-6)
    assert metrics.probability_difference(logits, answers, torch.tensor([0])).item() == pytest.approx(0.9, abs=1e-6)


def test_kendall_tau_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    y = torch.tensor([[1.0, 3.0, 2.0, 4.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    # One discordant pair out of six: (5 - 1) / 6.
    assert metrics.kendall_tau(x, y).tolist() == pytest.approx([2 / 3, -1.0, 1.0])


def test_kendall_tau_b_with_ties():
    x = torch.tensor([[1.0, 2.0, 2.0, 3.0]])
    y = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # 6 pairs, one tied in x: concordant 5, discordant 0 -> 5 / sqrt(5 * 6)
    assert metrics.kendall_tau(x, y).item() == pytest.approx(5 / math.sqrt(30), abs=1e-6)
    assert math.isnan(metrics.kendall_tau(torch.ones(1, 4), y).item())


def test_two_dimensional_logits_read_as_one_position():
    logits = torch.tensor([[1.0, 3.0, -2.0]])
    assert metrics.logit_difference(logits, torch.tensor([1]), torch.tensor([0])).item() == pytest.approx(2.0)


def test_per_position_targets():
    logits = torch.tensor([[[1.0, 3.0], [4.0, 0.0]]])  # one example, two positions
    correct = torch.tensor([[1, 0]])
    wrong = torch.tensor([[0, 1]])
    assert metrics.logit_difference(logits, correct, wrong).item() == pytest.approx((2.0 + 4.0) / 2)
    assert metrics.accuracy(logits, correct, wrong).item() == 1.0


def test_kendall_tau_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 6, (5, 12), generator=gen).float()  # small range: many ties
    y = torch.randint(0, 6, (5, 12), generator=gen).float()
    ours = metrics.kendall_tau(x, y)
    for row in range(5):
        ref = stats.kendalltau(x[row].numpy(), y[row].numpy()).statistic
        assert ours[row].item() == pytest.approx(ref, abs=1e-6)


def test_probability_difference_window_per_example():
    logits = torch.zeros(2, 1, 5)  # uniform over 5 answers: each 0.2
    answers = torch.arange(5)
    t = torch.tensor([2, 2])
    out = metrics.probability_difference(logits, answers, t, window=torch.tensor([1, 2]))
    assert out.tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    out = metrics.probability_difference(logits, answers, torch.tensor([1, 1]), window=torch.tensor([1, 3]))
    # t=1, w=1: P(2) - P(0) = 0; w=3: P(2..4) - P(0) = 0.6 - 0.2
    assert out.tolist() == pytest.approx([0.0, 0.4], abs=1e-6)
