"""A method's saved state for one job, so that an interrupted job resumes (`Checkpoint`).

The runner gives every job unit it will record a `Checkpoint` at ``<store>/checkpoints/<job_id>.pt``
(`ResultsStore.checkpoint_path`) as ``method.checkpoint`` before ``discover``
(`circuitbench.method.CircuitMethod`). A method that runs long (ACDC's search, Edge Pruning's
training) saves its state there now and then;
when the same job runs again after an interruption (the same command: a job in flight, or one
recorded as failed, is planned again) it loads the state and continues. The store removes the file
once the job is recorded (`ResultsStore.record`). A method that ignores its checkpoint still works.

The file is ``torch.save`` of ``{"format": FORMAT, "job_id": ..., "saved_at": ..., "state": ...}``,
written to a temporary name in the same folder, flushed, fsynced and renamed, so a reader finds the
previous state or the new one, never a part. `load` returns the state only for the same job (and
format); anything else (another job's file, an unreadable one) is ignored with a printed line. The
state's meaning is the method's: it stores its own version and configuration in it and checks them.

`StateSaver` is what the methods that checkpoint (ACDC's search, Edge Pruning's training) share:
the state's fingerprint (`fingerprint`: the method's state version, its resolved configuration
without run settings, the graph's shape, the task, the training examples' number and digest,
`examples_digest`, the seed, and whatever else the method adds), a save every ``every_s`` seconds
(`StateSaver.due`), the cost spent across processes (each save holds the cost so far; a resumed job
adds it to its own, `StateSaver.add_saved_cost`) and the record of where each resume began
(``info["resumed"]``). What a state holds besides is the method's.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from .store import atomic_write

FORMAT = 1


class Checkpoint:
    """The saved state of job ``job_id`` at ``path``: `load`, `save` (atomic), `clear`.

    ``job_id`` None: a checkpoint outside the runner (any saved job id is accepted)."""

    def __init__(self, path, job_id: str | None = None):
        self.path = Path(path)
        self.job_id = job_id
        self._save_failed = False

    def exists(self) -> bool:
        return self.path.exists()

    def say(self, text: str) -> None:
        """One line about this checkpoint on stderr."""
        print(f"checkpoint {self.path}: {text}", file=sys.stderr, flush=True)

    def load(self) -> dict | None:
        """The saved state, or None: no file, an unreadable one, or one written for another job (both
        said on stderr; the next `save` replaces it)."""
        if not self.path.exists():
            return None
        try:
            data = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # a damaged file must not stop the job: it starts afresh
            self.say(f"unreadable ({type(err).__name__}: {err}); starting afresh")
            return None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("state"), dict):
            self.say(f"not a checkpoint of format {FORMAT}; starting afresh")
            return None
        if self.job_id is not None and data.get("job_id") != self.job_id:
            self.say(f"written for job {data.get('job_id')}, not {self.job_id}; starting afresh")
            return None
        return data["state"]

    def save(self, state: dict) -> bool:
        """Write ``state`` (tensors, numbers, strings, lists, tuples, dicts) atomically; False when it
        could not be written (said once on stderr: the job goes on without checkpoints)."""
        buf = io.BytesIO()
        torch.save({"format": FORMAT, "job_id": self.job_id,
                    "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "state": state}, buf)
        try:
            atomic_write(self.path, buf.getvalue())
        except OSError as err:
            if not self._save_failed:
                self.say(f"cannot be written ({err}); the job goes on without checkpoints")
            self._save_failed = True
            return False
        return True

    def clear(self) -> None:
        """Remove the file (nothing when there is none)."""
        self.path.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, job_id={self.job_id!r})"


def examples_digest(examples) -> str:
    """A digest of examples' token ids and scored positions (part of a state's fingerprint: a job
    resumes only on the training examples it started on)."""
    h = hashlib.sha256()
    for t in (examples.clean, examples.corrupted, examples.attention_mask, examples.positions):
        if t is not None:
            h.update(str(tuple(t.shape)).encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def tensor_digest(tensor) -> str:
    """A digest of a tensor's shape, dtype and values (e.g. warm-start scores in a fingerprint)."""
    t = torch.as_tensor(tensor).detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)} {t.dtype}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint(version: int, config, run_settings, graph, task, train, seed, **extra) -> str:
    """The identity of a method's saved state: JSON of the state ``version``, the resolved ``config``
    (a dataclass or a dict) without ``per_task`` and the ``run_settings``, the graph's shape, the
    task's name, the training examples (their number and `examples_digest`), the seed and
    ``extra`` (more keys the method needs; none for ACDC). A state is resumed only under an equal one."""
    values = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    identity = {k: v for k, v in values.items() if k != "per_task" and k not in run_settings}
    return json.dumps({"version": version, "config": identity,
                       "graph": [graph.n_writers, graph.n_readers, int(graph.n_edges)],
                       "task": getattr(task, "name", None), "n_train": len(train), "seed": int(seed),
                       "train": examples_digest(train), **extra},
                      sort_keys=True, default=str)


class StateSaver:
    """A method's saves to its job's `Checkpoint`: the state (with its ``fingerprint``) every
    ``every_s`` seconds (the method asks `due` between two units of its work and calls `save`), and the
    state found at the start (`load`). Each save holds the cost spent so far (``cost``: the saved cost of
    earlier processes, ``meter``'s, a `circuitbench.method.CostMeter`, and the time of the phases in
    progress named in ``running``) and where earlier resumes began (``resumed``); a resumed job adds the
    saved cost to its own (`add_saved_cost`): work after the last save is lost and not counted.

    ``write`` False (a data-parallel rank other than 0): the saver never writes nor says anything;
    its state comes from rank 0 (`accept`)."""

    def __init__(self, checkpoint: Checkpoint, every_s: float, fingerprint: str, meter, write: bool = True):
        self.checkpoint, self.every_s, self.fingerprint, self.meter = checkpoint, float(every_s), fingerprint, meter
        self.write = write
        self.saved_cost = {"wall_s": {}, "forward_passes": 0, "backward_passes": 0}
        self.earlier: list[dict] = []  # where the resumes of earlier processes began
        self.resumed: list[dict] | None = None  # those and this one's, once resumed (``info["resumed"]``)
        self.running: dict[str, float] = {}  # phase -> its perf_counter start, while not yet in the meter
        self.saves = 0
        self.last = time.monotonic()

    def say(self, text: str) -> None:
        if self.write:
            self.checkpoint.say(text)

    def load(self, mismatch: str) -> dict | None:
        """The checkpoint's state when it has this fingerprint (then its cost and resumes are taken
        over); None when there is none or it is another's (``mismatch`` said on stderr)."""
        return self.accept(self.checkpoint.load(), mismatch)

    def accept(self, state: dict | None, mismatch: str) -> dict | None:
        """`load` for a state read elsewhere (rank 0 of a data-parallel group)."""
        if state is None:
            return None
        if state.get("fingerprint") != self.fingerprint:
            self.say(mismatch)
            return None
        self.saved_cost = dict(state["cost"])
        self.earlier = list(state.get("resumed", []))
        return state

    def resume(self, where: dict, text: str) -> None:
        """Record that this process resumes at ``where`` (plus the cost saved so far) and say ``text``."""
        self.resumed = self.earlier + [{**where, "saved_cost_s": sum(self.saved_cost["wall_s"].values())}]
        self.say(text)

    def due(self) -> bool:
        return time.monotonic() - self.last >= self.every_s

    def cost(self) -> dict:
        """What was spent up to now: the saved cost plus this process's (phases in progress counted to now)."""
        wall = dict(self.saved_cost["wall_s"])
        for k, v in self.meter.cost.wall_s.items():
            wall[k] = wall.get(k, 0.0) + v
        for k, t0 in self.running.items():
            wall[k] = wall.get(k, 0.0) + time.perf_counter() - t0
        return {"wall_s": wall, "forward_passes": self.saved_cost["forward_passes"] + self.meter.cost.forward_passes,
                "backward_passes": self.saved_cost["backward_passes"] + self.meter.cost.backward_passes}

    def save(self, state: dict) -> bool:
        """Write ``state`` with the fingerprint first and the cost and resumes last; restarts the timer."""
        ok = False
        if self.write:
            ok = self.checkpoint.save({"fingerprint": self.fingerprint, **state, "cost": self.cost(),
                                       "resumed": self.resumed or []})
            self.saves += 1 if ok else 0
        self.last = time.monotonic()
        return ok

    def add_saved_cost(self, cost) -> None:
        """Add what earlier processes spent (up to their last save) to this one's `Cost`."""
        saved = self.saved_cost
        for k, v in saved["wall_s"].items():
            cost.wall_s[k] = cost.wall_s.get(k, 0.0) + float(v)
        cost.forward_passes += int(saved["forward_passes"])
        cost.backward_passes += int(saved["backward_passes"])
