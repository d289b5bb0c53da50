"""A method's saved state for one job, so that an interrupted job resumes (`Checkpoint`).

The runner gives every job unit it will record a `Checkpoint` at ``<store>/checkpoints/<job_id>.pt``
(`ResultsStore.checkpoint_path`) as ``method.checkpoint`` before ``discover``
(`circuitbench.method.CircuitMethod`). A method that runs long saves its state there now and then;
when the same job runs again after an interruption (the same command: a job in flight, or one
recorded as failed, is planned again) it loads the state and continues. The store removes the file
once the job is recorded (`ResultsStore.record`). A method that ignores its checkpoint still works.

The file is ``torch.save`` of ``{"format": FORMAT, "job_id": ..., "saved_at": ..., "state": ...}``,
written to a temporary name in the same folder, flushed, fsynced and renamed, so a reader finds the
previous state or the new one, never a part. `load` returns the state only for the same job (and
format); anything else (another job's file, an unreadable one) is ignored with a printed line. The
state's meaning is the method's: it stores its own version and configuration in it and checks them.
"""
from __future__ import annotations

import io
import sys
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
