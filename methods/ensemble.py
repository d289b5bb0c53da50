"""Ensembles: several score methods run on the same data, their edge scores normalised and combined.

Hyperparameters (``--set ensemble.FIELD=VALUE``, or ``[method_config.ensemble]`` in a sweep file):

``members``
    the registered score-producing methods to combine, a list (``["eap", "eap-ig"]``) or a comma
    string (``--set ensemble.members=eap,random``); each at most once, never ``ensemble`` itself.
``member_config``
    each member's own hyperparameter overrides, by member name:
    ``--set 'ensemble.member_config={eap-ig={steps=10}}'`` or, in a file,
    ``[method_config.ensemble.member_config.eap-ig]`` with ``steps = 10``. Every member runs under
    the ensemble's preset (the sweep's ``method_preset``), then its overrides, then its own per-task
    entries, exactly as the same method would run alone.
``normalise``
    how each member's scores are put on one scale, over the graph's edges only (entries outside
    ``graph.valid`` are ignored; a NaN score counts as 0): take ``|score|`` (the harness ranks by
    it), then ``"rank"``: its rank among the edges, smallest 0 and largest ``n - 1``, tied values
    sharing the mean of their ranks, divided by ``n - 1`` (so in [0, 1]; a single edge gets 0.5), or
    ``"z"``: ``(|score| - mean) / std`` with the population standard deviation over the edges (all
    0 when every edge scores the same).
``combine``
    ``"mean"``, ``"min"`` or ``"max"`` of the members' normalised scores, edge by edge. The
    ensemble's score of an edge is that value (``rank``: in [0, 1]); under ``z`` it is shifted by
    the smallest combined value over the edges so that every score is >= 0 and the harness's
    ranking by |score| is the combined order. Edges outside the graph score 0.

An ensemble of one member ranks the edges as that member does: both normalisations keep the order
of |score| and its ties, and the harness breaks ties by edge order either way (exactly under
``rank``; under ``z`` up to the float32 rounding of the harness's cut, which could merge two scores
that differ by about 1e-7 of their size).

What it records: ``info["members"]`` lists every member with its preset, its resolved
hyperparameters, where its scores came from (``"ran"``, or ``"stored"`` with the job id) and its
own info and cost; the cost is the sum of the members' (wall time per member and phase, passes)
plus the combination, the peak memory the largest of the members'. The resolved member
hyperparameters are part of the ensemble's own (``member_config`` after resolution holds every
member's full configuration), so a job's id changes when a member's settings do.

Stored member scores: the runner hands a method the scores of complete jobs it can use
(`CircuitMethod.score_inputs`); an ensemble asks for each member under its resolved
hyperparameters, and uses the stored scores of a job of that member on the same task, model,
training and validation sizes, data seed, seed, dtype, device and tokenizer instead of running it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from circuitbench.errors import UserError
from circuitbench.method import CircuitMethod, Cost, CostMeter, MethodResult, get_method, list_methods, register_method

NORMALISATIONS = ("rank", "z")
COMBINATIONS = ("mean", "min", "max")


@dataclass
class EnsembleConfig:
    members: list | str = field(default_factory=lambda: ["eap", "eap-ig"])  # names, or one comma string
    combine: str = "mean"
    normalise: str = "rank"
    member_config: dict = field(default_factory=dict)  # {member name: {field: value}}
    per_task: dict = field(default_factory=dict)


# ---- the combination rules (pure functions) ------------------------------------------------------------
def normalise_scores(scores: torch.Tensor, valid: torch.Tensor, how: str) -> torch.Tensor:
    """``scores`` [W, R] put on the common scale ``how`` ("rank" or "z", see the module docstring)
    over the edges ``valid`` [W, R] (bool); float64 [W, R], 0 outside ``valid``."""
    if how not in NORMALISATIONS:
        raise UserError(f"ensemble.normalise must be one of {', '.join(NORMALISATIONS)}, got {how!r}")
    valid = valid.to(device=scores.device, dtype=torch.bool)
    x = torch.nan_to_num(scores.detach().double(), nan=0.0).abs()[valid]
    n = x.numel()
    if how == "rank":
        if n == 0:
            y = x
        elif n == 1:
            y = torch.full_like(x, 0.5)
        else:
            values, order = torch.sort(x, stable=True)
            _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
            ends = torch.cumsum(counts, 0).double()
            mean_rank = (2 * ends - counts.double() - 1) / 2  # the mean of ranks end - count ... end - 1
            y = torch.empty_like(x)
            y[order] = mean_rank[inverse] / (n - 1)
    else:
        std = x.std(unbiased=False) if n else x.new_tensor(0.0)
        y = (x - x.mean()) / std if n and float(std) > 0 else torch.zeros_like(x)
    out = torch.zeros(valid.shape, dtype=torch.float64, device=scores.device)
    out[valid] = y
    return out


def combine_scores(normalised: torch.Tensor, valid: torch.Tensor, how: str, shift: bool = False) -> torch.Tensor:
    """The members' normalised scores ``normalised`` [M, W, R] combined edge by edge (``how``: "mean",
    "min" or "max"); with ``shift``, minus the smallest combined value over ``valid`` (so all are
    >= 0). [W, R] float64, 0 outside ``valid``."""
    if how not in COMBINATIONS:
        raise UserError(f"ensemble.combine must be one of {', '.join(COMBINATIONS)}, got {how!r}")
    if how == "mean":
        out = normalised.mean(0)
    elif how == "min":
        out = normalised.min(0).values
    else:
        out = normalised.max(0).values
    valid = valid.to(device=out.device, dtype=torch.bool)
    if shift and bool(valid.any()):
        out = out - out[valid].min()
    return out.masked_fill(~valid, 0.0)


# ---- the method ---------------------------------------------------------------------------------------
def member_names(value) -> list[str]:
    """``members`` as a list of names (a comma string is split)."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UserError(f"ensemble.members must be a list of method names, got {value!r}")
    return list(value)


def _score_methods() -> list[str]:
    return [n for n, c in list_methods().items() if c.produces == "scores" and n != Ensemble.name]


@register_method
class Ensemble(CircuitMethod):
    name = "ensemble"
    description = "Ensemble of score methods: each member's |scores| rank- or z-normalised, combined by mean/min/max"
    Config = EnsembleConfig
    presets = {"paper": {}, "quick": {}, "smoke": {}}  # members run under the same preset
    produces = "scores"

    @classmethod
    def check_config(cls, config) -> None:
        names = member_names(config.members)
        valid = _score_methods()
        if not names:
            raise UserError(f"ensemble.members is empty; name one or more of the score methods: {', '.join(valid)}")
        bad = [n for n in names if n not in valid]
        if bad:
            known = list_methods()

            def why(n):
                if n == cls.name:
                    return "an ensemble cannot hold an ensemble"
                return "makes circuits, not scores" if n in known else "no such method"

            raise UserError(f"ensemble.members: {', '.join(f'{n!r} ({why(n)})' for n in bad)}; members can be "
                            f"the score methods {', '.join(valid)}")
        if len(set(names)) != len(names):
            raise UserError(f"ensemble.members lists a method twice: {', '.join(names)}")
        if config.combine not in COMBINATIONS:
            raise UserError(f"ensemble.combine must be one of {', '.join(COMBINATIONS)}, got {config.combine!r}")
        if config.normalise not in NORMALISATIONS:
            raise UserError(f"ensemble.normalise must be one of {', '.join(NORMALISATIONS)}, "
                            f"got {config.normalise!r}")
        mc = config.member_config
        if not isinstance(mc, dict) or not all(isinstance(v, dict) for v in mc.values()):
            raise UserError("ensemble.member_config must map member names to tables of hyperparameters, "
                            "e.g. {eap-ig = {steps = 10}}")
        extra = sorted(set(mc) - set(names))
        if extra:
            raise UserError(f"ensemble.member_config names {', '.join(extra)}, not among the members "
                            f"({', '.join(names)})")

    @classmethod
    def complete_config(cls, config, preset, task):
        """Every member's hyperparameters resolved for ``task`` (its preset, the overrides in
        ``member_config``, its per-task entries): ``member_config`` then holds each member's full
        configuration (per-task tables left out), which is what the job id hashes."""
        names = member_names(config.members)
        resolved = {}
        for name in names:
            try:
                mcfg = dataclasses.asdict(get_method(name).resolve_config(preset, config.member_config.get(name, {}),
                                                                          task))
            except UserError as err:
                raise UserError(f"ensemble member {name}: {err}") from None
            mcfg.pop("per_task", None)
            for setting in get_method(name).run_settings:  # as a member's own job id leaves them out
                mcfg.pop(setting, None)
            resolved[name] = mcfg
        return dataclasses.replace(config, members=names, member_config=resolved)

    @classmethod
    def score_inputs(cls, config: dict) -> dict[str, tuple[str, dict]]:
        return {name: (name, dict(config["member_config"][name])) for name in config["members"]}

    @classmethod
    def budget(cls, config: dict, n_train: int) -> str:
        parts = [f"{name}: {get_method(name).budget(config['member_config'][name], n_train)}"
                 for name in config["members"]]
        return (f"{config['combine']} of {config['normalise']}-normalised scores of "
                f"{len(parts)} member{'s' if len(parts) != 1 else ''} (" + "; ".join(parts) + ")")

    @classmethod
    def planned_passes(cls, config: dict, n_train: int, n_edges, n_sparsities: int) -> tuple[float, float]:
        """The members' planned passes, summed (each rescaled from the member's batch size to the
        runner's default batch for a method without one)."""
        from circuitbench.costs import planned_passes_for

        batch = max(1, min(32, n_train))
        fwd = bwd = 0.0
        for name in config["members"]:
            f, b, member_batch, _ = planned_passes_for(name, config["member_config"][name], n_train, n_edges,
                                                       n_sparsities)
            fwd += f * member_batch / batch
            bwd += b * member_batch / batch
        return fwd, bwd

    def discover(self, engine, task, train, validation, sparsities, seed=0, progress=True) -> MethodResult:
        cfg = self.config_for(task)
        g = engine.graph
        valid = g.valid.to(engine.device)
        wall, forward, backward, peaks = {}, 0, 0, []
        raw, members, log = [], [], []
        for name in cfg.members:
            entry = {"name": name, "preset": self.preset, "config": cfg.member_config[name]}
            stored = self.stored.get(name)
            if stored is not None:
                scores, cost = torch.as_tensor(stored.scores).float(), stored.cost
                entry.update(source="stored", job_id=stored.job_id)
            else:
                member = get_method(name)(preset=self.preset, **cfg.member_config[name])
                res = member.discover(engine, task, train, validation, sparsities, seed=seed, progress=progress)
                if res.scores is None:
                    raise UserError(f"ensemble member {name} returned no scores")
                scores, cost = res.scores, res.cost
                entry.update(source="ran", info=dict(res.info))
                log += [{"member": name, **e} for e in res.log]
            if tuple(scores.shape) != tuple(g.valid.shape):
                raise UserError(f"ensemble member {name}: scores of shape {tuple(scores.shape)}, the graph's "
                                f"edge matrix is {tuple(g.valid.shape)}")
            entry["cost"] = cost.to_dict()
            members.append(entry)
            for phase, s in cost.wall_s.items():
                wall[f"{name}/{phase}"] = wall.get(f"{name}/{phase}", 0.0) + float(s)
            forward += int(cost.forward_passes)
            backward += int(cost.backward_passes)
            if cost.peak_memory_mib is not None:
                peaks.append(float(cost.peak_memory_mib))
            raw.append(scores)
        # a member's meter resets the peak-memory mark, so the ensemble's meter starts after them
        meter = CostMeter(engine.device)
        with meter.phase("combine"):
            normalised = [normalise_scores(x.to(engine.device), valid, cfg.normalise) for x in raw]
            combined = combine_scores(torch.stack(normalised), valid, cfg.combine, shift=cfg.normalise == "z")
        own = meter.finish()
        wall["combine"] = own.wall_s["combine"]
        if own.peak_memory_mib is not None:
            peaks.append(own.peak_memory_mib)
        cost = Cost(wall_s=wall, forward_passes=forward, backward_passes=backward,
                    peak_memory_mib=max(peaks) if peaks else None)
        return MethodResult(scores=combined.float().cpu(), cost=cost, log=log,
                            info={"members": members, "combine": cfg.combine, "normalise": cfg.normalise})
