"""The results store: an SQLite database plus circuit files, in one results folder.

Layout of a results folder (default ``results/``)::

    results.db                  SQLite database (WAL journal), schema below
    circuits/<run_id>.json      each evaluated circuit, native circuitbench JSON (no scores)
    scores/<job_id>.npy         the edge scores of a score-based job (float32 [W, R], NaN = no edge),
                                kept so a larger sparsity grid later cuts them without rediscovery
    checkpoints/<job_id>.pt     a job in flight's saved method state (`circuitbench.checkpoint`; ACDC's
                                search, Edge Pruning's training), resumed when the job runs again,
                                removed once it is recorded

Vocabulary: a **job** is one discovery: method x task x model x n_train x seed (x target sparsity
for methods that train one circuit per target, such as Edge Pruning). A **run** is one circuit a
job produced and its evaluation: score-based jobs (EAP, ACDC) have one run per sparsity of the
sweep, the others exactly one. Every run is evaluated on the task's test split.

Schema (``PRAGMA user_version`` = `SCHEMA_VERSION`)::

    jobs                       one row per job
      job_id TEXT PRIMARY KEY  16 hex digits of sha256(config)
      config TEXT              canonical JSON of everything that defines the job (what is hashed)
      method, method_preset, task, model, dtype TEXT; n_train, n_validation, data_seed, seed INTEGER
      method_config TEXT       JSON of the method's resolved hyperparameters (per-task entries applied)
      target_sparsity REAL     the trained-for target (circuit methods); NULL for score methods
      status TEXT              'complete' or 'failed' (a job in flight has no row)
      error TEXT               the failure's message ('failed' only)
      wall_s TEXT              JSON {phase: seconds} of the discovery; wall_total_s REAL their sum
      forward_passes, backward_passes INTEGER; peak_memory_mib REAL (NULL: not measurable)
      device TEXT ('cpu', 'cuda:0'), device_name TEXT (CPU model / GPU name), threads INTEGER
      host TEXT; versions TEXT (JSON: python, circuitbench, torch, transformers, ...)
      graph TEXT               JSON {"layers", "heads", "kv_heads", "n_kv_heads", "has_mlp", "edges"}
                               and "parallel": true for a model with parallel blocks
      scores_file TEXT         relative path of the scores file, or NULL
      log TEXT, info TEXT      JSON: the method's log (training curve ...) and facts (MethodResult)
      started_at, finished_at TEXT (ISO 8601, UTC)
      derived_from TEXT        JSON list of the run ids a *derived* job's circuit was built from (the
                               case study's intersection, method ``intersection``); NULL for a discovery

    runs                       one row per evaluated circuit of a complete job
      run_id TEXT PRIMARY KEY  '<job_id>-s<target sparsity>'
      job_id TEXT              -> jobs.job_id
      target_sparsity REAL     the sweep's sparsity; sparsity REAL the realised 1 - edges/total_edges
      n_edges, total_edges, n_nodes INTEGER
      n_effective INTEGER      edges on an input -> logits path of kept edges (`Graph.effective_edges`;
                               NULL in runs recorded before it was stored)
      circuit_file TEXT        relative path of the circuit JSON
      n_examples INTEGER       test examples it was evaluated on
      eval_s REAL              wall time of its evaluation; finished_at TEXT

    metrics                    (run_id, split, metric) PRIMARY KEY; value REAL
                               every metric of the task, mean over the split's examples

    reference_metrics          the full model and the empty circuit, once per test split
      ref_id TEXT              16 hex digits of sha256 of (task, model, dtype, device, data_seed, eval_limit)
      task, model, dtype, device TEXT; data_seed, eval_limit INTEGER (NULL = whole split),
      n_validation INTEGER (NULL = the task's default; the test split is drawn after validation)
      split TEXT, circuit TEXT ('full' or 'empty'), metric TEXT, value REAL, created_at TEXT
      PRIMARY KEY (ref_id, split, circuit, metric)

    edge_faithfulness          per-edge faithfulness of a circuit (paper appendix D, figure 7;
                               computed by `circuitbench.faithfulness`, recorded as an
                               `EdgeFaithfulnessResult`)
      study_id TEXT            16 hex digits of sha256 of (circuit edges, model, task, split, data seed,
                               examples): one study = one circuit measured once; a rerun replaces it
      circuit_name TEXT        the run id, or the circuit file's name
      run_id TEXT              the stored run the circuit came from (NULL for an outside file)
      circuit_file TEXT        the path given
      task, model, split TEXT; data_seed, n_examples, circuit_edges INTEGER; device, loss TEXT
      circuit_loss REAL        loss(model ‖ C) itself
      edge TEXT                the edge's name (a3.h2->a5.h1<q>)
      model_without, circuit_without REAL; created_at TEXT
      PRIMARY KEY (study_id, edge)

Schema versions and migrations. Version 1: the tables above without ``jobs.derived_from`` and
``edge_faithfulness`` (that table, when present, was made by the report). Version 2 adds both; a
writable `ResultsStore` migrates an older store in place when it opens it (one transaction),
marking the jobs whose config names ``intersection_of`` as derived. A read-only store
(``readonly=True``, what the report opens) never writes: an older store is copied into memory and
migrated there.

Guarantees. A job's row, its runs and all their metrics are written in one transaction, after
its circuit files are on disk (each written to a temporary name, flushed and renamed), so a
crash or ``kill -9`` at any moment leaves either the whole job or nothing of it. Writes use
``BEGIN IMMEDIATE`` with a busy timeout on a WAL-journalled database, so several processes can
record into one store at once without losing a row; a job already recorded complete is never
recorded twice (the second writer's copy is dropped). The query methods return pandas
DataFrames for the report: `ResultsStore.runs`, `ResultsStore.metrics`,
`ResultsStore.reference_metrics`; `ResultsStore.circuit` loads a stored circuit.
"""
from __future__ import annotations

import json
import math
import os
import sqlite3
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import UserError

SCHEMA_VERSION = 2
DB_NAME = "results.db"
BUSY_TIMEOUT_S = 120.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    method TEXT NOT NULL,
    method_preset TEXT,
    method_config TEXT,
    task TEXT NOT NULL,
    model TEXT NOT NULL,
    dtype TEXT,
    n_train INTEGER,
    n_validation INTEGER,
    data_seed INTEGER,
    seed INTEGER,
    target_sparsity REAL,
    status TEXT NOT NULL CHECK (status IN ('complete', 'failed')),
    error TEXT,
    wall_s TEXT,
    wall_total_s REAL,
    forward_passes INTEGER,
    backward_passes INTEGER,
    peak_memory_mib REAL,
    device TEXT,
    device_name TEXT,
    threads INTEGER,
    host TEXT,
    versions TEXT,
    graph TEXT,
    scores_file TEXT,
    log TEXT,
    info TEXT,
    started_at TEXT,
    finished_at TEXT,
    derived_from TEXT
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs(job_id) ON DELETE CASCADE,
    target_sparsity REAL NOT NULL,
    sparsity REAL NOT NULL,
    n_edges INTEGER NOT NULL,
    n_effective INTEGER,
    total_edges INTEGER NOT NULL,
    n_nodes INTEGER,
    circuit_file TEXT NOT NULL,
    n_examples INTEGER,
    eval_s REAL,
    finished_at TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_job ON runs(job_id);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs(run_id) ON DELETE CASCADE,
    split TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (run_id, split, metric)
);
CREATE TABLE IF NOT EXISTS reference_metrics (
    ref_id TEXT NOT NULL,
    task TEXT NOT NULL,
    model TEXT NOT NULL,
    dtype TEXT,
    device TEXT,
    data_seed INTEGER,
    eval_limit INTEGER,
    n_validation INTEGER,
    split TEXT NOT NULL,
    circuit TEXT NOT NULL CHECK (circuit IN ('full', 'empty')),
    metric TEXT NOT NULL,
    value REAL,
    created_at TEXT,
    PRIMARY KEY (ref_id, split, circuit, metric)
);
"""

_EDGE_FAITHFULNESS_TABLE = """
CREATE TABLE IF NOT EXISTS edge_faithfulness (
    study_id TEXT NOT NULL,
    circuit_name TEXT,
    run_id TEXT,
    circuit_file TEXT,
    task TEXT NOT NULL,
    model TEXT NOT NULL,
    split TEXT NOT NULL,
    data_seed INTEGER,
    n_examples INTEGER,
    circuit_edges INTEGER,
    device TEXT,
    loss TEXT,
    circuit_loss REAL,
    edge TEXT NOT NULL,
    model_without REAL,
    circuit_without REAL,
    created_at TEXT,
    PRIMARY KEY (study_id, edge)
)"""
_SCHEMA += _EDGE_FAITHFULNESS_TABLE

# Columns of `jobs` copied verbatim from a job record (`record_job`'s ``job`` argument).
JOB_FIELDS = ("job_id", "config", "method", "method_preset", "method_config", "task", "model", "dtype",
              "n_train", "n_validation", "data_seed", "seed", "target_sparsity", "wall_s",
              "wall_total_s", "forward_passes", "backward_passes", "peak_memory_mib", "device",
              "device_name", "threads", "host", "versions", "graph", "log", "info", "started_at",
              "finished_at", "derived_from")
RUN_FIELDS = ("run_id", "job_id", "target_sparsity", "sparsity", "n_edges", "n_effective", "total_edges", "n_nodes",
              "circuit_file", "n_examples", "eval_s", "finished_at")
JSON_FIELDS = ("config", "method_config", "wall_s", "versions", "graph", "log", "info", "derived_from")
EDGE_FAITHFULNESS_FIELDS = ("study_id", "circuit_name", "run_id", "circuit_file", "task", "model", "split",
                            "data_seed", "n_examples", "circuit_edges", "device", "loss", "circuit_loss", "edge",
                            "model_without", "circuit_without", "created_at")


def now_iso() -> str:
    """The current UTC time, ISO 8601 with seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_id_for(job_id: str, target_sparsity: float) -> str:
    """The run id of ``job_id``'s circuit at ``target_sparsity`` (stable text, safe as a file name)."""
    return f"{job_id}-s{float(target_sparsity):.6g}"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _json(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=_json_default)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _finite(value):
    """SQLite stores NaN as NULL; keep infinities as they are."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


# Columns added to version 1 after its first release (a version-1 store may lack them).
_V1_ADDED_COLUMNS = {"reference_metrics": [("n_validation", "INTEGER")], "runs": [("n_effective", "INTEGER")]}


@contextmanager
def _transaction(conn: sqlite3.Connection):
    conn.execute("BEGIN")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _migrate(conn: sqlite3.Connection, version: int) -> None:
    """Bring the schema of ``conn`` (inside the caller's write transaction, or an in-memory copy)
    from ``version`` to `SCHEMA_VERSION`. Version 0: an empty database gets the whole schema."""
    if version == 0:
        # one statement at a time: executescript would commit the open transaction first
        for statement in filter(str.strip, _SCHEMA.split(";")):
            conn.execute(statement)
    if 0 < version < 2:
        for table, columns in {**_V1_ADDED_COLUMNS, "jobs": [("derived_from", "TEXT")]}.items():
            have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            for col, typ in columns:
                if col not in have:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {col} {typ}")
        # the edge-faithfulness table a version-1 report may have made has these columns already
        conn.execute(_EDGE_FAITHFULNESS_TABLE)
        # version 1 marked a derived job (the case study's intersection) only in its config
        derived = []
        for job_id, config in conn.execute("SELECT job_id, config FROM jobs"):
            try:
                of = json.loads(config).get("intersection_of") if config else None
            except (json.JSONDecodeError, AttributeError):
                of = None
            if isinstance(of, list) and len(of) == 2:
                derived.append((json.dumps(of), job_id))
        conn.executemany("UPDATE jobs SET derived_from = ? WHERE job_id = ?", derived)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


class ResultsStore:
    """The results folder ``path`` (or a path to its ``results.db``); created on first use.

    ``readonly``: open an existing store for reading only (the report): nothing is ever written to
    it; a store of an older schema is copied into memory and migrated there."""

    def __init__(self, path, create: bool = True, readonly: bool = False):
        path = Path(path)
        if path.suffix == ".db":
            self.root, self.db_path = path.parent, path
        else:
            self.root, self.db_path = path, path / DB_NAME
        self.readonly = readonly
        if (readonly or not create) and not self.db_path.exists():
            raise UserError(f"no results store at {self.root} (no {DB_NAME}); run `circuitbench run` first")
        if create and not readonly:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise UserError(f"cannot create the results folder {self.root}: {err.strerror}") from None
        self._conn: sqlite3.Connection | None = None
        self._pid = None
        self._connect()

    # ---- connection -------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        # A connection must not cross a fork: reconnect in a child process.
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        try:
            if self.readonly:
                # A plain connection that refuses writes (query_only, below) when the folder takes
                # files: the last one to close removes SQLite's -wal and -shm files, as a writer's
                # does. SQLite's read-only mode (a read-only folder) would leave them behind.
                writable = os.access(self.db_path, os.W_OK) and os.access(self.db_path.parent, os.W_OK)
                target = self.db_path if writable else f"{self.db_path.resolve().as_uri()}?mode=ro"
                conn = sqlite3.connect(target, uri=not writable, timeout=BUSY_TIMEOUT_S, isolation_level=None)
                conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                conn.execute("PRAGMA query_only = ON")
                version = conn.execute("PRAGMA user_version").fetchone()[0]
            else:
                conn = sqlite3.connect(self.db_path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
                conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as err:
            raise UserError(f"cannot open the results store {self.db_path}: {err}") from None
        except sqlite3.DatabaseError as err:
            raise UserError(f"{self.db_path} is not a circuitbench results database: {err}") from None
        if self.readonly:
            if version > SCHEMA_VERSION:
                conn.close()
                raise UserError(f"{self.db_path} has store schema {version}; this circuitbench reads "
                                f"{SCHEMA_VERSION}: upgrade circuitbench")
            if version < SCHEMA_VERSION:  # an older store: migrate a copy in memory, never the file
                memory = sqlite3.connect(":memory:", isolation_level=None)
                conn.backup(memory)
                conn.close()
                conn = memory
                with _transaction(conn):
                    _migrate(conn, version)
                conn.execute("PRAGMA query_only = ON")
            self._conn, self._pid = conn, os.getpid()
            return conn
        if mode.lower() != "wal":
            raise UserError(f"cannot put {self.db_path} in WAL mode (got {mode!r}); is the folder on a "
                            f"file system without shared-memory support?")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        self._conn, self._pid = conn, os.getpid()
        self._ensure_schema()
        return conn

    def _ensure_schema(self) -> None:
        conn = self._conn
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise UserError(f"{self.db_path} has store schema {version}; this circuitbench reads "
                            f"{SCHEMA_VERSION}: upgrade circuitbench")
        with self._write():
            # re-read under the write lock: another process may have migrated it meanwhile
            _migrate(conn, conn.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def _write(self):
        """One write transaction; ``BEGIN IMMEDIATE`` takes the write lock up front so concurrent
        writers queue on the busy timeout instead of failing when a read upgrades to a write."""
        if self.readonly:
            raise UserError(f"the results store {self.root} was opened read-only")
        conn = self._connect()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    def __getstate__(self):
        return {"root": self.root, "db_path": self.db_path, "readonly": self.readonly}

    def __setstate__(self, state):
        self.root, self.db_path = state["root"], state["db_path"]
        self.readonly = state.get("readonly", False)
        self._conn, self._pid = None, None

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.root)!r})"

    # ---- state queries used by the runner ---------------------------------------------------------
    def job_status(self, job_ids: Iterable[str] | None = None) -> dict[str, str]:
        """``{job_id: status}`` for the given jobs (all stored jobs when None); unknown ids are absent."""
        conn = self._connect()
        if job_ids is None:
            return dict(conn.execute("SELECT job_id, status FROM jobs"))
        ids = list(job_ids)
        out = {}
        for i in range(0, len(ids), 500):  # SQLite caps the number of bound parameters
            chunk = ids[i:i + 500]
            q = f"SELECT job_id, status FROM jobs WHERE job_id IN ({','.join('?' * len(chunk))})"
            out.update(conn.execute(q, chunk))
        return out

    def run_sparsities(self, job_id: str) -> set[float]:
        """The target sparsities already evaluated for a job."""
        rows = self._connect().execute("SELECT target_sparsity FROM runs WHERE job_id = ?", (job_id,))
        return {float(r[0]) for r in rows}

    def scores(self, job_id: str) -> np.ndarray | None:
        """The stored edge scores of a score-based job, or None."""
        row = self._connect().execute("SELECT scores_file FROM jobs WHERE job_id = ? AND status = 'complete'",
                                      (job_id,)).fetchone()
        if row is None or row[0] is None:
            return None
        path = self.root / row[0]
        return np.load(path) if path.exists() else None

    def scored_jobs(self, method: str, task: str, model: str) -> list[dict]:
        """The complete jobs of ``method`` on ``task`` and ``model`` that stored scores: one dict each
        with job_id, config (parsed), wall_s (parsed), forward_passes, backward_passes, peak_memory_mib."""
        rows = self._connect().execute(
            "SELECT job_id, config, wall_s, forward_passes, backward_passes, peak_memory_mib FROM jobs "
            "WHERE method = ? AND task = ? AND model = ? AND status = 'complete' AND scores_file IS NOT NULL "
            "ORDER BY finished_at, job_id", (method, task, model))
        return [{"job_id": r[0], "config": json.loads(r[1]) if r[1] else {}, "wall_s": json.loads(r[2]) if r[2] else {},
                 "forward_passes": r[3] or 0, "backward_passes": r[4] or 0, "peak_memory_mib": r[5]} for r in rows]

    def has_references(self, ref_id: str) -> bool:
        row = self._connect().execute("SELECT 1 FROM reference_metrics WHERE ref_id = ? LIMIT 1", (ref_id,))
        return row.fetchone() is not None

    # ---- writes -------------------------------------------------------------------------------------
    def _write_files(self, runs: list[dict], circuits: dict, scores, job_id: str) -> str | None:
        """Circuit (and scores) files first: a transaction only ever points at files on disk."""
        for run in runs:
            data = circuits[run["run_id"]]
            rel = f"circuits/{run['run_id']}.json"
            atomic_write(self.root / rel, json.dumps(data).encode())
            run["circuit_file"] = rel
        if scores is None:
            return None
        rel = f"scores/{job_id}.npy"
        with tempfile.SpooledTemporaryFile() as buf:
            np.save(buf, np.asarray(scores, dtype=np.float32))
            buf.seek(0)
            atomic_write(self.root / rel, buf.read())
        return rel

    def record(self, result) -> bool:
        """Write what a unit of a sweep or a derived step returned (`circuitbench.result`): a complete
        job with its runs, metrics, circuit files and scores (a discovered or a derived one); runs
        added to a complete job; a failed job with its error; a test split's reference metrics; a
        stored run's metrics on another split; an edge-faithfulness study. False when the store
        already held it (an edge-faithfulness study is replaced instead)."""
        if result.kind == "reference":
            return self.record_references(result.row(), result.values)
        if result.kind == "metrics":
            return self.add_metrics(result.run_id, result.split, result.values)
        if result.kind == "edge_faithfulness":
            return self.record_edge_faithfulness(result.rows())
        if result.kind == "failed":
            return self.record_failure(result.row(), result.error)
        if result.kind == "extend":
            return self.add_runs(result.spec.job_id, list(result.runs), result.metrics, result.circuits) > 0
        recorded = self.record_job(result.row(), list(result.runs), result.metrics, result.circuits, result.scores)
        self.checkpoint_path(result.spec.job_id).unlink(missing_ok=True)  # the job is complete now
        return recorded

    def checkpoint_path(self, job_id: str) -> Path:
        """Where job ``job_id``'s method saves its state while it runs (`circuitbench.checkpoint`);
        `record` removes the file once the job is complete (a failed job keeps it for its retry)."""
        return self.root / "checkpoints" / f"{job_id}.pt"

    def record_job(self, job: dict, runs: list[dict], metrics: dict[str, dict[str, dict[str, float]]],
                   circuits: dict[str, dict], scores=None) -> bool:
        """Record a complete job with its runs and every metric, in one transaction.

        ``job``: the `jobs` columns (``JOB_FIELDS``; dict/list values are stored as JSON).
        ``runs``: one dict per circuit with the `runs` columns except ``circuit_file``.
        ``metrics``: ``{run_id: {split: {metric: value}}}``, one entry for every run.
        ``circuits``: ``{run_id: circuit JSON dict}`` (`Circuit.to_dict`), written as files.
        ``scores``: the [W, R] score matrix of a score-based job, or None.
        Returns False (and writes nothing to the database) when the job is already complete.
        """
        missing = [r["run_id"] for r in runs if not metrics.get(r["run_id"])]
        if missing:
            raise ValueError(f"job {job['job_id']}: runs without metrics: {missing}")
        if self.job_status([job["job_id"]]).get(job["job_id"]) == "complete":
            return False
        runs = [dict(r) for r in runs]
        scores_file = self._write_files(runs, circuits, scores, job["job_id"])
        with self._write() as conn:
            # Re-checked under the write lock: another process may have finished it meanwhile.
            row = conn.execute("SELECT status FROM jobs WHERE job_id = ?", (job["job_id"],)).fetchone()
            if row is not None and row[0] == "complete":
                return False
            if row is not None:  # a failed attempt: replace it
                conn.execute("DELETE FROM jobs WHERE job_id = ?", (job["job_id"],))
            values = {k: (_json(job.get(k)) if k in JSON_FIELDS else job.get(k)) for k in JOB_FIELDS}
            values.update(status="complete", error=None, scores_file=scores_file)
            self._insert(conn, "jobs", values)
            self._insert_runs(conn, runs, metrics)
        return True

    def add_runs(self, job_id: str, runs: list[dict], metrics: dict, circuits: dict) -> int:
        """Add runs (new sparsities cut from stored scores) to a complete job; returns how many were new."""
        runs = [dict(r) for r in runs]
        known = self.run_sparsities(job_id)
        runs = [r for r in runs if float(r["target_sparsity"]) not in known]
        if not runs:
            return 0
        self._write_files(runs, circuits, None, job_id)
        with self._write() as conn:
            row = conn.execute("SELECT status FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None or row[0] != "complete":
                raise ValueError(f"job {job_id} is not a complete job of this store")
            have = {r[0] for r in conn.execute("SELECT run_id FROM runs WHERE job_id = ?", (job_id,))}
            runs = [r for r in runs if r["run_id"] not in have]
            self._insert_runs(conn, runs, metrics)
        return len(runs)

    def add_metrics(self, run_id: str, split: str, values: dict[str, float]) -> bool:
        """Add a run's metrics on another split (e.g. the case study's cross-setting ``test@<task>``),
        in one transaction. False (nothing written) when the run already has metrics on ``split``."""
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
                raise ValueError(f"no run {run_id} in this store")
            if conn.execute("SELECT 1 FROM metrics WHERE run_id = ? AND split = ? LIMIT 1",
                            (run_id, split)).fetchone():
                return False
            conn.executemany("INSERT INTO metrics (run_id, split, metric, value) VALUES (?, ?, ?, ?)",
                             [(run_id, split, m, _finite(v)) for m, v in values.items()])
        return True

    def record_edge_faithfulness(self, rows: list[dict]) -> bool:
        """Store one edge-faithfulness study (rows with `EDGE_FAITHFULNESS_FIELDS`, one per edge, one
        ``study_id``), replacing an earlier study of the same id, in one transaction."""
        ids = {r["study_id"] for r in rows}
        if len(ids) != 1:
            raise ValueError(f"an edge-faithfulness study has one study_id, got {len(ids)}")
        with self._write() as conn:
            conn.execute("DELETE FROM edge_faithfulness WHERE study_id = ?", (ids.pop(),))
            conn.executemany(f"INSERT INTO edge_faithfulness ({', '.join(EDGE_FAITHFULNESS_FIELDS)}) VALUES "
                             f"({', '.join('?' * len(EDGE_FAITHFULNESS_FIELDS))})",
                             [[r.get(k) for k in EDGE_FAITHFULNESS_FIELDS] for r in rows])
        return True

    def _insert_runs(self, conn, runs, metrics):
        for run in runs:
            self._insert(conn, "runs", {k: run.get(k) for k in RUN_FIELDS})
            for split, values in metrics[run["run_id"]].items():
                conn.executemany("INSERT INTO metrics (run_id, split, metric, value) VALUES (?, ?, ?, ?)",
                                 [(run["run_id"], split, m, _finite(v)) for m, v in values.items()])

    @staticmethod
    def _insert(conn, table, values: dict):
        cols = list(values)
        conn.execute(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                     [values[c] for c in cols])

    def record_failure(self, job: dict, error: str) -> bool:
        """Record that a job failed (a rerun retries it). Never overwrites a complete job."""
        with self._write() as conn:
            row = conn.execute("SELECT status FROM jobs WHERE job_id = ?", (job["job_id"],)).fetchone()
            if row is not None and row[0] == "complete":
                return False
            conn.execute("DELETE FROM jobs WHERE job_id = ?", (job["job_id"],))
            values = {k: (_json(job.get(k)) if k in JSON_FIELDS else job.get(k)) for k in JOB_FIELDS}
            values.update(status="failed", error=str(error)[:4000])
            self._insert(conn, "jobs", values)
        return True

    def record_references(self, ref: dict, values: dict[str, dict[str, dict[str, float]]]) -> bool:
        """Store reference metrics ``{split: {"full"|"empty": {metric: value}}}`` for ``ref`` (a dict
        with ref_id, task, model, dtype, device, data_seed, eval_limit). False if already stored."""
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM reference_metrics WHERE ref_id = ? LIMIT 1", (ref["ref_id"],)).fetchone():
                return False
            created = now_iso()
            rows = [(ref["ref_id"], ref["task"], ref["model"], ref.get("dtype"), ref.get("device"),
                     ref.get("data_seed"), ref.get("eval_limit"), ref.get("n_validation"), split, circuit, metric,
                     _finite(v), created)
                    for split, per_circuit in values.items()
                    for circuit, per_metric in per_circuit.items()
                    for metric, v in per_metric.items()]
            conn.executemany("INSERT INTO reference_metrics (ref_id, task, model, dtype, device, data_seed, "
                             "eval_limit, n_validation, split, circuit, metric, value, created_at) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return True

    # ---- queries for the report -------------------------------------------------------------------
    @staticmethod
    def _where(filters: dict, prefix: str = "") -> tuple[str, list]:
        clauses, params = [], []
        for col, want in filters.items():
            if want is None:
                continue
            values = [want] if isinstance(want, (str, int, float)) else list(want)
            clauses.append(f"{prefix}{col} IN ({','.join('?' * len(values))})")
            params.extend(values)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params

    def runs(self, method=None, task=None, model=None, status: str | None = "complete",
             with_metrics: bool = False):
        """One row per run (a circuit of a job) with its job's configuration and cost.

        Columns: run_id, job_id, method, method_preset, task, model, dtype, n_train, n_validation,
        data_seed, seed, target_sparsity, sparsity (realised), n_edges, n_effective, total_edges, n_nodes,
        circuit_file, n_examples, eval_s, status, wall_total_s, ``wall_s.<phase>`` for every phase, forward_passes,
        backward_passes, peak_memory_mib, runs_in_job (runs sharing this job's discovery cost),
        device, device_name, threads, host, circuitbench_version, torch_version, transformers_version,
        versions (JSON), method_config (JSON), config (JSON), derived_from (a tuple of run ids for a
        derived job, else None), started_at, finished_at. With
        ``with_metrics``: one more column per ``<split>/<metric>`` (e.g. ``test/kl``).
        ``status=None`` also lists failed jobs (one row each, with NaN run columns and ``error``).
        Filters take a value or a list of values.
        """
        import pandas as pd

        where, params = self._where({"method": method, "task": task, "model": model, "status": status}, "j.")
        join = "LEFT JOIN" if status != "complete" else "JOIN"
        q = (f"SELECT r.run_id, j.job_id, j.method, j.method_preset, j.task, j.model, j.dtype, j.n_train, "
             f"j.n_validation, j.data_seed, j.seed, COALESCE(r.target_sparsity, j.target_sparsity) "
             f"AS target_sparsity, r.sparsity, r.n_edges, r.n_effective, r.total_edges, r.n_nodes, r.circuit_file, "
             f"r.n_examples, r.eval_s, "
             f"j.status, j.error, j.wall_total_s, j.wall_s, j.forward_passes, j.backward_passes, "
             f"j.peak_memory_mib, (SELECT COUNT(*) FROM runs r2 WHERE r2.job_id = j.job_id) AS runs_in_job, "
             f"j.device, j.device_name, j.threads, j.host, j.versions, j.method_config, j.config, j.derived_from, "
             f"j.started_at, j.finished_at "
             f"FROM jobs j {join} runs r ON r.job_id = j.job_id{where} "
             f"ORDER BY j.method, j.task, j.model, j.n_train, j.seed, target_sparsity, r.run_id")
        df = pd.read_sql_query(q, self._connect(), params=params)
        df["derived_from"] = [tuple(json.loads(v)) if isinstance(v, str) else None for v in df["derived_from"]]
        walls = [json.loads(w) if w else {} for w in df["wall_s"]]
        phases = sorted({p for w in walls for p in w})
        for p in phases:
            df[f"wall_s.{p}"] = [w.get(p, float("nan")) for w in walls]
        df = df.drop(columns=["wall_s"])
        versions = [json.loads(v) if v else {} for v in df["versions"]]
        for lib in ("circuitbench", "torch", "transformers"):
            df[f"{lib}_version"] = [v.get(lib) for v in versions]
        if status == "complete":
            df = df.drop(columns=["error"])
        if with_metrics and len(df):
            m = self.metrics(method=method, task=task, model=model)
            if len(m):
                wide = m.assign(col=m["split"] + "/" + m["metric"]).pivot_table(
                    index="run_id", columns="col", values="value", aggfunc="first")
                wide.columns.name = None
                df = df.merge(wide, how="left", left_on="run_id", right_index=True)
        return df.reset_index(drop=True)

    def job_logs(self, method=None, task=None, model=None):
        """One row per complete job with its log and info parsed from JSON: job_id, method,
        method_preset, task, model, n_train, seed, target_sparsity, log (list of dicts), info (dict),
        wall_total_s, device_name, threads."""
        import pandas as pd

        where, params = self._where({"method": method, "task": task, "model": model, "status": "complete"})
        q = ("SELECT job_id, method, method_preset, task, model, n_train, seed, target_sparsity, log, info, "
             f"wall_total_s, device_name, threads FROM jobs{where} ORDER BY method, task, model, n_train, seed, "
             "target_sparsity, job_id")
        df = pd.read_sql_query(q, self._connect(), params=params)
        df["log"] = [json.loads(v) if v else [] for v in df["log"]]
        df["info"] = [json.loads(v) if v else {} for v in df["info"]]
        return df

    def metrics(self, method=None, task=None, model=None, split=None, metric=None):
        """Long table: run_id, job_id, method, task, model, n_train, seed, target_sparsity, sparsity,
        n_edges, n_effective, split, metric, value (complete jobs only)."""
        import pandas as pd

        where, params = self._where({"j.method": method, "j.task": task, "j.model": model,
                                     "m.split": split, "m.metric": metric})
        where = (where + " AND" if where else " WHERE") + " j.status = 'complete'"
        q = ("SELECT m.run_id, j.job_id, j.method, j.task, j.model, j.n_train, j.seed, r.target_sparsity, "
             "r.sparsity, r.n_edges, r.n_effective, m.split, m.metric, m.value FROM metrics m "
             "JOIN runs r ON r.run_id = m.run_id JOIN jobs j ON j.job_id = r.job_id"
             f"{where} ORDER BY j.method, j.task, j.model, r.target_sparsity, m.run_id, m.split, m.metric")
        return pd.read_sql_query(q, self._connect(), params=params)

    def reference_metrics(self, task=None, model=None, split=None):
        """Long table of the full-model and empty-circuit values: ref_id, task, model, dtype, device,
        data_seed, eval_limit, n_validation, split, circuit ('full'/'empty'), metric, value."""
        import pandas as pd

        where, params = self._where({"task": task, "model": model, "split": split})
        q = ("SELECT ref_id, task, model, dtype, device, data_seed, eval_limit, n_validation, split, circuit, "
             "metric, value "
             f"FROM reference_metrics{where} ORDER BY task, model, split, circuit, metric")
        return pd.read_sql_query(q, self._connect(), params=params)

    def edge_faithfulness(self):
        """Every stored edge-faithfulness row (columns `EDGE_FAITHFULNESS_FIELDS`), oldest study first."""
        import pandas as pd

        return pd.read_sql_query("SELECT * FROM edge_faithfulness ORDER BY created_at, study_id, edge",
                                 self._connect())

    def circuit(self, job_id: str, sparsity: float | None = None):
        """The stored `Circuit` of a run: ``job_id`` is a run id, or a job id with ``sparsity``
        (which may be left out when the job has one run)."""
        from .circuit import Circuit
        from .graph import Graph

        conn = self._connect()
        row = conn.execute("SELECT r.circuit_file, j.graph FROM runs r JOIN jobs j ON j.job_id = r.job_id "
                           "WHERE r.run_id = ?", (job_id,)).fetchone()
        if row is None:
            rows = conn.execute("SELECT r.circuit_file, j.graph, r.target_sparsity FROM runs r "
                                "JOIN jobs j ON j.job_id = r.job_id WHERE j.job_id = ?", (job_id,)).fetchall()
            if sparsity is not None:
                rows = [r for r in rows if math.isclose(r[2], float(sparsity), abs_tol=1e-9)]
            if not rows:
                raise UserError(f"no stored circuit for {job_id!r}"
                                + (f" at sparsity {sparsity}" if sparsity is not None else ""))
            if len(rows) > 1:
                raise UserError(f"job {job_id} has {len(rows)} circuits; name a sparsity "
                                f"({', '.join(f'{r[2]:g}' for r in rows)})")
            row = rows[0]
        g = json.loads(row[1])
        return Circuit.load(self.root / row[0], Graph.from_dict(g))

    def counts(self) -> dict[str, int]:
        """Numbers of complete and failed jobs, runs and reference sets (for messages and tests)."""
        conn = self._connect()
        st = dict(conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status"))
        return {"complete": st.get("complete", 0), "failed": st.get("failed", 0),
                "runs": conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0],
                "references": conn.execute("SELECT COUNT(DISTINCT ref_id) FROM reference_metrics").fetchone()[0]}

    def integrity_check(self) -> str:
        """SQLite's own integrity check ('ok' when the file is sound)."""
        return self._connect().execute("PRAGMA integrity_check").fetchone()[0]


def check_writable(folder) -> Path:
    """Make sure ``folder`` exists (or can be made) and takes files; UserError otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}-{time.monotonic_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"results folder {folder} is not writable: {err.strerror or err}") from None
    return folder
