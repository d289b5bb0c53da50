"""Circuit metrics: pure functions on logits at the scored positions.

Every function takes logits ``[B, P, V]`` (the ``P`` scored positions of ``B`` examples; a
``[B, V]`` tensor is read as ``P = 1``) and returns one value per example, ``[B]``; a metric over
several positions is the mean over them. Nothing here reduces over the batch: callers average.

``restrict`` (a LongTensor of token ids, ``[K]`` or ``[B, K]``) limits a distribution to those
tokens and renormalises it (Greater-Than's 100 two-digit tokens or 10 digits). Maths is done in
float32 whatever the logits' dtype, so bf16 models do not lose the small differences KL measures.

The MIB circuit-track scores at the end (`circuit_performance_ratio`, CPR; `circuit_model_distance`,
CMD) are of a different kind: they take a whole faithfulness curve (one value per circuit size,
already averaged over examples) and integrate it; see their docstrings.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "restrict_logits",
    "kl_divergence",
    "logit_difference",
    "accuracy",
    "exact_match",
    "probability_difference",
    "kendall_tau",
    "MIB_EDGE_FRACTIONS",
    "normalised_faithfulness",
    "mib_curve_points",
    "circuit_performance_ratio",
    "circuit_model_distance",
]


def _as_bpv(logits: torch.Tensor) -> torch.Tensor:
    if logits.dim() == 2:
        logits = logits.unsqueeze(1)
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, P, V] or [B, V], got {tuple(logits.shape)}")
    return logits.float()


def _as_bp(ids: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-example ids ``[B]`` or per-position ids ``[B, P]`` as ``[B, P]`` on the logits' device."""
    ids = ids.to(logits.device).long()
    if ids.dim() == 1:
        ids = ids.unsqueeze(1).expand(-1, logits.shape[1])
    if ids.shape != logits.shape[:2]:
        raise ValueError(f"ids {tuple(ids.shape)} do not match logits {tuple(logits.shape)}")
    return ids


def restrict_logits(logits: torch.Tensor, restrict: torch.Tensor | None) -> torch.Tensor:
    """Logits over only the ``restrict`` token ids, ``[B, P, K]`` (all of ``V`` when None)."""
    logits = _as_bpv(logits)
    if restrict is None:
        return logits
    restrict = restrict.to(logits.device).long()
    if restrict.dim() == 1:
        return logits[..., restrict]
    if restrict.dim() == 2 and restrict.shape[0] == logits.shape[0]:
        index = restrict.unsqueeze(1).expand(-1, logits.shape[1], -1)
        return logits.gather(-1, index)
    raise ValueError(f"restrict must be [K] or [B, K], got {tuple(restrict.shape)}")


def kl_divergence(full_logits: torch.Tensor, circuit_logits: torch.Tensor,
                  restrict: torch.Tensor | None = None) -> torch.Tensor:
    """KL(full ‖ circuit) per example: Σ p_full (log p_full − log p_circuit), mean over positions."""
    log_p = F.log_softmax(restrict_logits(full_logits, restrict), dim=-1)
    log_q = F.log_softmax(restrict_logits(circuit_logits, restrict), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    # KL is never negative; float rounding on (near-)identical distributions can make it -1e-9.
    return kl.clamp(min=0).mean(1)


def logit_difference(logits: torch.Tensor, correct: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """log P(correct) − log P(wrong) per example (equal to the raw logit difference)."""
    logits = _as_bpv(logits)
    correct, wrong = _as_bp(correct, logits), _as_bp(wrong, logits)
    # Softmax normalisation cancels in the difference, so raw logits are exact and cheaper.
    diff = logits.gather(-1, correct.unsqueeze(-1)) - logits.gather(-1, wrong.unsqueeze(-1))
    return diff.squeeze(-1).mean(1)


def accuracy(logits: torch.Tensor, correct: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """1.0 where the correct answer's logit beats the misleading one's (mean over positions)."""
    logits = _as_bpv(logits)
    correct, wrong = _as_bp(correct, logits), _as_bp(wrong, logits)
    hit = logits.gather(-1, correct.unsqueeze(-1)) > logits.gather(-1, wrong.unsqueeze(-1))
    return hit.squeeze(-1).float().mean(1)


def exact_match(full_logits: torch.Tensor, circuit_logits: torch.Tensor,
                restrict: torch.Tensor | None = None) -> torch.Tensor:
    """1.0 where the circuit's top prediction equals the full model's (mean over positions)."""
    full = restrict_logits(full_logits, restrict).argmax(-1)
    circuit = restrict_logits(circuit_logits, restrict).argmax(-1)
    return (full == circuit).float().mean(1)


def probability_difference(logits: torch.Tensor, answer_ids: torch.Tensor, threshold: torch.Tensor,
                           window: int | torch.Tensor | None = None) -> torch.Tensor:
    """P(answer above threshold) − P(answer below threshold), over the renormalised answer set.

    ``answer_ids`` are the ordered answers (``answer_ids[k]`` is the token for value ``k``, e.g. the
    token "07" for k = 7); ``threshold`` ``[B]`` is each example's value (Greater-Than's YY).
    Without ``window``: Σ_{k>t} p_k − Σ_{k<t} p_k. With ``window = w``: Σ_{t<k≤t+w} p_k −
    Σ_{t−w≤k<t} p_k (Greater-Than's "probability difference 10"); ``window`` may be one int or
    one per example ``[B]``.
    """
    probs = F.softmax(restrict_logits(logits, answer_ids), dim=-1)  # [B, P, K]
    values = torch.arange(probs.shape[-1], device=probs.device)
    t = threshold.to(probs.device).long().view(-1, 1, 1)
    above, below = values > t, values < t
    if window is not None:
        w = torch.as_tensor(window, device=probs.device).long().view(-1, 1, 1)
        above = above & (values <= t + w)
        below = below & (values >= t - w)
    diff = (probs * above).sum(-1) - (probs * below).sum(-1)
    return diff.mean(1)


def kendall_tau(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Kendall's τ-b between the rankings that ``x`` and ``y`` ``[B, K]`` (or ``[B, P, K]``) give.

    Pairs tied in both count in neither, as in τ-b; a row where either ranking is constant has no
    defined τ and gets NaN, so an average over examples does not hide it.
    """
    x, y = x.float(), y.float()
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.dim() == 2:
        x, y = x.unsqueeze(1), y.unsqueeze(1)
    k = x.shape[-1]
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=x.device), diagonal=1)
    sx = torch.sign(x.unsqueeze(-1) - x.unsqueeze(-2))[..., upper]  # [B, P, K(K-1)/2]
    sy = torch.sign(y.unsqueeze(-1) - y.unsqueeze(-2))[..., upper]
    concordance = (sx * sy).sum(-1)
    untied_x = (sx != 0).sum(-1).float()
    untied_y = (sy != 0).sum(-1).float()
    tau = concordance / torch.sqrt(untied_x * untied_y)  # 0/0 -> NaN for constant rankings
    return tau.mean(1)


# ---- MIB's circuit-track scores: areas under the faithfulness curve ------------------------------------
# Mueller et al. 2025, "MIB: A Mechanistic Interpretability Benchmark", circuit localisation track. Its
# evaluation (MIB-circuit-track, `MIB_circuit_track/evaluation.py: evaluate_area_under_curve`) keeps the
# top k of the edges for each k below, scores each circuit's faithfulness and integrates the curve with
# the trapezoid rule over x = k itself (the requested fraction, linear axis, no normalisation by the
# width of the range); CPR is the area under f, CMD the area under |1 - f|.
MIB_EDGE_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
_GRID_TOL = 1e-9  # fractions that differ by less than this are the same circuit size


def normalised_faithfulness(circuit, full, empty) -> torch.Tensor:
    """MIB's faithfulness f = (m(C) − m(∅)) / (m(N) − m(∅)), elementwise (broadcasting): 0 is the
    empty circuit's value of the metric m, 1 the full model's. NaN where ``full == empty`` (nothing
    to normalise by). Float64."""
    c, n, e = (torch.as_tensor(v, dtype=torch.float64) for v in (circuit, full, empty))
    span = n - e
    return torch.where(span != 0, (c - e) / torch.where(span != 0, span, torch.ones_like(span)),
                       torch.full_like(c - e, math.nan))


def _curve(kept, faithfulness) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.as_tensor(kept, dtype=torch.float64)
    f = torch.as_tensor(faithfulness, dtype=torch.float64)
    if k.dim() != 1 or f.dim() < 1 or f.shape[-1] != k.shape[0]:
        raise ValueError(f"kept must be [N] and faithfulness [..., N], got {tuple(k.shape)} and {tuple(f.shape)}")
    order = torch.argsort(k)
    k, f = k[order], f[..., order]
    if len(k) > 1 and bool((k[1:] - k[:-1] <= _GRID_TOL).any()):
        raise ValueError("kept lists one fraction twice")
    return k, f


def _at(k: torch.Tensor, f: torch.Tensor, x: float) -> torch.Tensor:
    """f at ``x`` (within the measured range), linear between the measured points; [...]."""
    near = torch.nonzero((k - x).abs() <= _GRID_TOL)
    if len(near):
        return f[..., int(near[0])]
    i = int(torch.searchsorted(k, torch.tensor(x, dtype=k.dtype))) - 1  # k[i] < x < k[i + 1]
    w = (x - float(k[i])) / float(k[i + 1] - k[i])
    return f[..., i] + w * (f[..., i + 1] - f[..., i])


def mib_curve_points(kept, faithfulness, grid=MIB_EDGE_FRACTIONS) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The points CPR and CMD integrate: ``(x [M], f [..., M], how)``.

    ``kept`` [N]: the fraction of edges each circuit was asked to keep (any order, each once);
    ``faithfulness`` [..., N]: its normalised faithfulness (`normalised_faithfulness`). ``how``:

    * ``"grid"``: every fraction of ``grid`` was measured; exactly those points are returned (other
      measured sizes are left out, so the area is the one MIB computes on its grid);
    * ``"measured"``: the measured sizes reach from ``grid[0]`` to ``grid[-1]`` but are not (all)
      MIB's: every measured point inside that range, with f at the two ends interpolated linearly
      between the neighbouring measured points where an end itself was not measured;
    * ``"short"``: the measured sizes do not reach one end of the range; no points (the area would
      need an extrapolation, so there is none).
    """
    k, f = _curve(kept, faithfulness)
    lo, hi = float(min(grid)), float(max(grid))
    if all(bool(((k - g).abs() <= _GRID_TOL).any()) for g in grid):
        pick = [int(torch.nonzero((k - g).abs() <= _GRID_TOL)[0]) for g in sorted(grid)]
        return torch.tensor(sorted(float(g) for g in grid), dtype=torch.float64), f[..., pick], "grid"
    if not len(k) or float(k[0]) > lo + _GRID_TOL or float(k[-1]) < hi - _GRID_TOL:
        return torch.zeros(0, dtype=torch.float64), f[..., :0], "short"
    inside = (k > lo + _GRID_TOL) & (k < hi - _GRID_TOL)
    x = torch.cat([torch.tensor([lo], dtype=torch.float64), k[inside], torch.tensor([hi], dtype=torch.float64)])
    y = torch.cat([_at(k, f, lo).unsqueeze(-1), f[..., inside], _at(k, f, hi).unsqueeze(-1)], dim=-1)
    return x, y, "measured"


def _trapezoid(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if len(x) < 2:
        return torch.full(y.shape[:-1], math.nan, dtype=torch.float64)
    return ((x[1:] - x[:-1]) * (y[..., 1:] + y[..., :-1]) / 2).sum(-1)


def circuit_performance_ratio(kept, faithfulness, grid=MIB_EDGE_FRACTIONS) -> torch.Tensor:
    """MIB's CPR: the trapezoid area under the faithfulness curve f(k) over the fraction of edges
    kept k, from ``grid[0]`` to ``grid[-1]`` (MIB: 0.1% to 100% of the edges), on a linear k axis and
    not divided by the width of the range, as MIB computes it (so f = 1 at every size gives 0.999 on
    MIB's grid). Higher is better; f may leave [0, 1], and so may CPR.

    ``kept`` [N], ``faithfulness`` [..., N] -> [...] (float64). Which points are integrated:
    `mib_curve_points` (MIB's own points when all were measured; the measured ones otherwise; NaN
    when the measured sizes do not cover the range)."""
    x, y, _ = mib_curve_points(kept, faithfulness, grid)
    return _trapezoid(x, y)


def circuit_model_distance(kept, faithfulness, grid=MIB_EDGE_FRACTIONS) -> torch.Tensor:
    """MIB's CMD: the trapezoid area under |1 − f(k)| over the same points and range as
    `circuit_performance_ratio` (the trapezoid of the pointwise |1 − f|, as MIB computes it). 0 is
    a circuit as faithful as the full model at every size; lower is better.
    ``kept`` [N], ``faithfulness`` [..., N] -> [...] (float64)."""
    x, y, _ = mib_curve_points(kept, faithfulness, grid)
    return _trapezoid(x, (1.0 - y).abs())
