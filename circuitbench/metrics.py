"""Circuit metrics: pure functions on logits at the scored positions.

Every function takes logits ``[B, P, V]`` (the ``P`` scored positions of ``B`` examples; a
``[B, V]`` tensor is read as ``P = 1``) and returns one value per example, ``[B]``; a metric over
several positions is the mean over them. Nothing here reduces over the batch: callers average.

``restrict`` (a LongTensor of token ids, ``[K]`` or ``[B, K]``) limits a distribution to those
tokens and renormalises it (Greater-Than's 100 two-digit tokens or 10 digits). Maths is done in
float32 whatever the logits' dtype, so bf16 models do not lose the small differences KL measures.
"""
from __future__ import annotations

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
