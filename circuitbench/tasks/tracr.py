"""Tracr tasks: the compiled programs' whole input domains, scored against the programs' true outputs.

* ``tracr-xproportion`` (model ``tracr:xproportion``): every sequence of 1..5 tokens over
  {a, b, c, x}; every non-BOS position's numeric output (the running fraction of "x") is scored.
  Loss: mean squared error to the full model; metrics ``mse_full`` (the loss) and ``mse`` (to the
  program's true output).
* ``tracr-reverse`` (model ``tracr:reverse``): every sequence of 1..5 tokens over {1, 2, 3}; every
  non-BOS position's categorical output (the reversed sequence) is scored. The model's output
  scores over {1, 2, 3} are read as logits. Loss: KL(full ‖ circuit); metrics ``kl`` (the loss),
  ``accuracy`` (argmax equals the program's true output) and ``exact_match`` (argmax equals the
  full model's).

Each metric is a mean over an example's scored positions. Splits: the domain is small (1,364 and
363 inputs), so train = validation = test = the whole domain, in a fixed order; a smaller size
asks for a seeded random subset per split. Ablation is zero ablation (as in the Edge Pruning
paper); the corrupted prompt of each example (for interchange ablation, if asked for) is a seeded
random other input of the same length.

Positions: ``positions`` is ``[n, 5]``; an input of n < 5 tokens repeats its last position and
``targets["scored"]`` (bool ``[n, 5]``) marks the real ones. ``targets["value"]`` (xproportion,
float) or ``targets["answer"]`` (reverse, index into the output values) hold the true outputs.
``ground_truth()`` returns the program's ground-truth edges (`circuitbench.tracr.ground_truth`).
"""
from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..tracr import TracrTokenizer, get_program, ground_truth
from . import register_task
from .base import Examples, Splits, Task, pad_right

SPLITS = ("train", "validation", "test")


def _rng(seed: int, *keys: str) -> np.random.Generator:
    """An independent random stream per (seed, task, split, purpose)."""
    return np.random.default_rng([seed, *(zlib.crc32(k.encode()) for k in keys)])


def _masked_mean(values: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [B, P] over each example's scored positions -> [B]."""
    scored = scored.to(values.device, values.dtype)
    return (values * scored).sum(1) / scored.sum(1).clamp(min=1)


class TracrTask(Task):
    """A task over the whole input domain of one compiled Tracr program."""

    program: str
    ablation = "zero"

    def __init__(self):
        self.spec = get_program(self.program)
        self.default_model = f"tracr:{self.program}"
        n = len(self.spec.domain())
        self.sizes = {"train": n, "validation": n, "test": n}

    def ground_truth(self) -> list[str]:
        """The program's ground-truth edges (see `circuitbench.tracr.ground_truth`)."""
        return ground_truth(self.program)

    def build(self, tokenizer, seed: int = 0, n_train: int | None = None,
              sizes: dict[str, int] | None = None) -> Splits:
        if not isinstance(tokenizer, TracrTokenizer) or tokenizer.name != self.program:
            raise UserError(f"task {self.name} runs on the model {self.default_model} only "
                            f"(got a tokenizer of {getattr(tokenizer, 'name', type(tokenizer).__name__)})")
        sizes = self.resolve_sizes(n_train, sizes)
        domain = self.spec.domain()
        built = {}
        for split in SPLITS:
            size = sizes[split]
            if size > len(domain):
                raise UserError(f"task {self.name} has {len(domain)} inputs (its whole domain); "
                                f"cannot build a {split} split of {size}")
            if size == len(domain):
                rows = np.arange(len(domain))
            else:
                rows = np.sort(_rng(seed, self.name, split).choice(len(domain), size, replace=False))
            corrupt_rng = _rng(seed, self.name, split, "corrupted")
            built[split] = self._examples([domain[i] for i in rows], tokenizer, corrupt_rng)
        return Splits(**built, dropped={s: 0 for s in SPLITS})

    def _examples(self, inputs: list[tuple], tokenizer: TracrTokenizer,
                  corrupt_rng: np.random.Generator) -> Examples:
        spec = self.spec
        P = spec.max_seq_len
        by_length: dict[int, list[tuple]] = {}
        for seq in spec.domain():
            by_length.setdefault(len(seq), []).append(seq)
        corrupted, positions, scored, truth, texts = [], [], [], [], []
        for seq in inputs:
            n = len(seq)
            pool = by_length[n]
            if len(pool) == 1:
                other = seq
            else:  # a random different input of the same length
                other = seq
                while other == seq:
                    other = pool[int(corrupt_rng.integers(len(pool)))]
            corrupted.append(other)
            positions.append(list(range(1, n + 1)) + [n] * (P - n))
            scored.append([True] * n + [False] * (P - n))
            answer = spec.semantics(list(seq))
            out = [spec.output_values.index(v) for v in answer] if spec.output == "categorical" else answer
            truth.append(out + [out[-1]] * (P - n))
            texts.append({
                "clean": " ".join([tokenizer.bos_token] + [str(t) for t in seq]),
                "corrupted": " ".join([tokenizer.bos_token] + [str(t) for t in other]),
                "answer": " ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in answer),
            })
        clean_ids, mask = pad_right([tokenizer.encode(s, add_bos=True) for s in inputs], tokenizer.pad_id)
        bad_ids, _ = pad_right([tokenizer.encode(s, add_bos=True) for s in corrupted], tokenizer.pad_id)
        targets = {"scored": torch.tensor(scored, dtype=torch.bool).reshape(len(inputs), P)}
        if spec.output == "categorical":
            targets["answer"] = torch.tensor(truth, dtype=torch.long).reshape(len(inputs), P)
        else:
            targets["value"] = torch.tensor(truth, dtype=torch.float32).reshape(len(inputs), P)
        return Examples(clean=clean_ids, corrupted=bad_ids, attention_mask=mask,
                        positions=torch.tensor(positions, dtype=torch.long).reshape(len(inputs), P),
                        targets=targets, texts=texts)


@register_task("tracr-xproportion")
class TracrXProportion(TracrTask):
    name = "tracr-xproportion"
    program = "xproportion"
    description = ('Tracr make_frac_prevs(tokens == "x") over {a,b,c,x}: the running fraction of "x" '
                   "at every position; all inputs of length 1-5")
    metrics = ("mse_full", "mse")

    def loss(self, circuit_logits, full_logits, batch):
        diff = circuit_logits[..., 0].float() - full_logits[..., 0].float()
        return _masked_mean(diff ** 2, batch.targets["scored"])

    def objective(self, logits, batch):
        value = batch.targets["value"].to(logits.device)
        return -_masked_mean((logits[..., 0].float() - value) ** 2, batch.targets["scored"])

    def score(self, circuit_logits, full_logits, batch):
        value = batch.targets["value"].to(circuit_logits.device)
        return {
            "mse_full": self.loss(circuit_logits, full_logits, batch),
            "mse": _masked_mean((circuit_logits[..., 0].float() - value) ** 2, batch.targets["scored"]),
        }


@register_task("tracr-reverse")
class TracrReverse(TracrTask):
    name = "tracr-reverse"
    program = "reverse"
    description = "Tracr make_reverse(tokens) over {1,2,3}: the reversed sequence; all inputs of length 1-5"
    metrics = ("kl", "accuracy", "exact_match")

    def loss(self, circuit_logits, full_logits, batch):
        log_p = F.log_softmax(full_logits.float(), -1)
        log_q = F.log_softmax(circuit_logits.float(), -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        return _masked_mean(kl, batch.targets["scored"])

    def objective(self, logits, batch):
        answer = batch.targets["answer"].to(logits.device)
        log_q = F.log_softmax(logits.float(), -1).gather(-1, answer.unsqueeze(-1)).squeeze(-1)
        return _masked_mean(log_q, batch.targets["scored"])

    def score(self, circuit_logits, full_logits, batch):
        answer = batch.targets["answer"].to(circuit_logits.device)
        predicted = circuit_logits.argmax(-1)
        return {
            "kl": self.loss(circuit_logits, full_logits, batch),
            "accuracy": _masked_mean((predicted == answer).float(), batch.targets["scored"]),
            "exact_match": _masked_mean((predicted == full_logits.argmax(-1)).float(), batch.targets["scored"]),
        }
