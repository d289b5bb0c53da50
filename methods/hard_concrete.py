"""The hard-concrete distribution (Louizos et al. 2018) that Edge Pruning's masks follow.

With log alpha the parameter, temperature beta and stretch interval [l, r] (l < 0 < 1 < r):
u ~ U(eps, 1 - eps); s = sigmoid((log u - log(1 - u) + log alpha) / beta); z = clamp(s (r - l) + l,
0, 1). A mask is exactly 0 or 1 with positive probability, and P(z > 0) = sigmoid(log alpha -
beta log(-l / r)) is differentiable: the expected density the sparsity penalty uses. The
deterministic mask used to discretise is clamp(sigmoid(log alpha) (r - l) + l, 0, 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HardConcrete:
    beta: float = 2.0 / 3.0
    left: float = -0.1
    right: float = 1.1
    eps: float = 1e-6

    def __post_init__(self):
        if not (self.left < 0.0 < 1.0 < self.right):
            raise ValueError(f"the stretch interval must satisfy l < 0 < 1 < r, got [{self.left}, {self.right}]")
        if self.beta <= 0 or not 0 < self.eps < 0.5:
            raise ValueError(f"bad hard-concrete constants beta={self.beta} eps={self.eps}")

    def sample(self, log_alpha: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One sample z with the shape of ``log_alpha`` (differentiable in log alpha)."""
        u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device, dtype=log_alpha.dtype)
        u = u * (1 - 2 * self.eps) + self.eps
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / self.beta)
        return (s * (self.right - self.left) + self.left).clamp(0.0, 1.0)

    def prob_nonzero(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """P(z > 0) per entry (the expected density)."""
        return torch.sigmoid(log_alpha - self.beta * math.log(-self.left / self.right))

    def deterministic(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """The test-time mask clamp(sigmoid(log alpha) (r - l) + l, 0, 1)."""
        return (torch.sigmoid(log_alpha) * (self.right - self.left) + self.left).clamp(0.0, 1.0)
