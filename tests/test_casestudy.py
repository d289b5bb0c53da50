"""The case study: the sweep it runs, the store rows table 2 reads, and clean errors."""
from __future__ import annotations

import pytest
import torch

from circuitbench.casestudy import (FS_TASK, IP_TASK, LABEL_SPARSITY, case_study_sweep, chance_overlap,
                                    ep_settings, run_casestudy)
from circuitbench.cli import main
from circuitbench.errors import UserError


def test_paper_preset_is_the_papers_codellama_setting():
    s = ep_settings("paper", checkpoint=True)
    assert s == {"batch_size": 1, "edge_target": 1.2, "node_target": 0.7, "lr": 0.8, "lambda_lr": 0.4,
                 "steps": 6000, "ramp_steps": 5000, "gradient_checkpointing": True}
    # quick and smoke change the steps only
    for preset in ("quick", "smoke"):
        other = ep_settings(preset)
        assert {k: v for k, v in other.items() if k not in ("steps", "ramp_steps", "gradient_checkpointing")} == \
            {k: v for k, v in s.items() if k not in ("steps", "ramp_steps", "gradient_checkpointing")}
    with pytest.raises(UserError):
        ep_settings("huge")
    with pytest.raises(UserError):
        ep_settings("smoke", steps=0)


def test_sweep_has_one_edge_pruning_job_per_setting():
    sweep = case_study_sweep("random:llama-tiny", "smoke", steps=3, n_train=4, limit=4)
    jobs, refs = sweep.plan()
    assert sorted(j.task for j in jobs) == [FS_TASK, IP_TASK]
    assert all(j.method == "ep" and j.sparsities == (LABEL_SPARSITY,) and j.n_train == 4 for j in jobs)
    assert all(j.method_config["edge_target"] == 1.2 and j.method_config["steps"] == 3 for j in jobs)
    assert len(refs) == 2
    # the case study's preset is a named layer of the sweep; what it and --steps change is said
    assert "(settings: defaults < case-study preset smoke < command line)" in sweep.describe()
    lines = sweep.override_lines(jobs)
    assert "edge_target None -> 1.2" in lines[0] and lines[0].endswith("[case-study preset smoke] on boolexpr-ip, "
                                                                       "boolexpr-fs")
    assert "steps 8 -> 3" in lines[1] and "[command line]" in lines[1]


def test_chance_overlap():
    assert chance_overlap(1041, 1464, 3_872_820) == pytest.approx(0.3935, abs=1e-3)
    assert chance_overlap(10, 10, 100) == 1.0


def test_dry_run_runs_nothing(tmp_path, capsys):
    code = main(["casestudy", "boolexpr", "--model", "random:llama-tiny", "--preset", "smoke", "--results",
                 str(tmp_path / "r"), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "2 jobs planned" in out and "memory per device, random:llama-tiny" in out
    assert not (tmp_path / "r" / "results.db").exists()


def test_unknown_study_is_one_line_error(capsys):
    assert main(["casestudy", "arithmetic"]) == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow  # two Edge Pruning jobs, their evaluations and references: ~1 min on 2 busy cores
def test_smoke_case_study_writes_the_table_2_rows(tmp_path):
    from circuitbench.report.data import load_report_data
    from circuitbench.report.tables import case_study_table
    from circuitbench.store import ResultsStore

    torch.set_num_threads(1)
    results = str(tmp_path / "results")
    summary = run_casestudy("random:llama-tiny", preset="smoke", results=results, steps=6, n_train=4, limit=4,
                            progress=False)
    store = ResultsStore(results, create=False)
    try:
        m = store.metrics()
        splits = set(zip(m["run_id"], m["split"]))
        assert (summary["ip_run"], "test") in splits and (summary["ip_run"], f"test@{FS_TASK}") in splits
        assert (summary["fs_run"], "test") in splits and (summary["fs_run"], f"test@{IP_TASK}") in splits
        assert (summary["intersection_run"], "test") in splits
        assert (summary["intersection_run"], f"test@{FS_TASK}") in splits
        a, b = store.circuit(summary["ip_run"]), store.circuit(summary["fs_run"])
        inter = store.circuit(summary["intersection_run"])
        assert torch.equal(inter.edges, a.edges & b.edges) and summary["overlap"] == inter.n_edges
        assert summary["chance_overlap"] == pytest.approx(a.n_edges * b.n_edges / a.graph.n_edges)
        # the report knows the intersection by the store's explicit field, not by its config
        derived = store.runs().set_index("run_id")["derived_from"]
        assert derived[summary["intersection_run"]] == (summary["ip_run"], summary["fs_run"])
        assert derived[summary["ip_run"]] is None
        counts = store.counts()
    finally:
        store.close()
    table = case_study_table(load_report_data(results)).table
    assert list(table["circuit"]) == ["IP", "FS", "IP ∩ FS"]
    assert not table[["IP accuracy", "IP exact match", "FS accuracy", "FS exact match"]].isna().any().any()
    assert table["overlap by chance"].iloc[2] == pytest.approx(summary["chance_overlap"])
    # a rerun resumes: nothing new is discovered or recorded
    again = run_casestudy("random:llama-tiny", preset="smoke", results=results, steps=6, n_train=4, limit=4,
                          progress=False)
    assert again["intersection_run"] == summary["intersection_run"]
    store = ResultsStore(results, create=False)
    try:
        assert store.counts() == counts
    finally:
        store.close()
