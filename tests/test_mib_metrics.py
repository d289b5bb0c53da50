"""MIB's CPR and CMD (Mueller et al. 2025): hand-computed curves, which points are integrated when the
sweep's sizes are not MIB's, the ``--sparsities mib`` shorthand, and the values in the report's AUC
table and in ``circuitbench results``."""
from __future__ import annotations

import json
import math

import pytest
import torch

from circuitbench.cli import main
from circuitbench.metrics import (MIB_EDGE_FRACTIONS, circuit_model_distance, circuit_performance_ratio,
                                  mib_curve_points, normalised_faithfulness)

MIB = list(MIB_EDGE_FRACTIONS)


def mib_by_hand(k, f):
    """MIB's sums written out: one trapezoid per pair of neighbouring sizes, on the k axis itself."""
    cpr = cmd = 0.0
    for i in range(len(k) - 1):
        width = k[i + 1] - k[i]
        cpr += width * (f[i] + f[i + 1]) / 2
        cmd += width * (abs(1 - f[i]) + abs(1 - f[i + 1])) / 2
    return cpr, cmd


def test_normalised_faithfulness():
    f = normalised_faithfulness(torch.tensor([-1.0, 1.0, 3.0, 5.0]), 3.0, -1.0)
    assert torch.allclose(f, torch.tensor([0.0, 0.5, 1.0, 1.5], dtype=torch.float64))
    assert math.isnan(float(normalised_faithfulness(2.0, 1.0, 1.0)))  # full == empty: nothing to normalise by


def test_constant_and_linear_curves_on_mibs_grid():
    ones = [1.0] * 10
    assert float(circuit_performance_ratio(MIB, ones)) == pytest.approx(0.999)  # not divided by the width
    assert float(circuit_model_distance(MIB, ones)) == pytest.approx(0.0)
    # f = k is linear, so the trapezoids are exact: CPR = (1 - 0.001^2)/2, CMD = 0.999 - CPR
    assert float(circuit_performance_ratio(MIB, MIB)) == pytest.approx((1 - 0.001 ** 2) / 2)
    assert float(circuit_model_distance(MIB, MIB)) == pytest.approx(0.999 - (1 - 0.001 ** 2) / 2)
    assert float(circuit_performance_ratio(MIB, [0.0] * 10)) == 0.0
    assert float(circuit_model_distance(MIB, [0.0] * 10)) == pytest.approx(0.999)


def test_a_curve_above_one_by_hand():
    # sizes 0.1, 0.5, 1 with f = 0, 2, 1: CPR = 0.4 (0 + 2)/2 + 0.5 (2 + 1)/2 = 1.15 and, |1 - f| being
    # taken pointwise as MIB does, CMD = 0.4 (1 + 1)/2 + 0.5 (1 + 0)/2 = 0.65
    grid = (0.1, 0.5, 1.0)
    assert float(circuit_performance_ratio([0.1, 0.5, 1.0], [0.0, 2.0, 1.0], grid)) == pytest.approx(1.15)
    assert float(circuit_model_distance([0.1, 0.5, 1.0], [0.0, 2.0, 1.0], grid)) == pytest.approx(0.65)


def test_a_typical_curve_matches_mibs_sums():
    f = [0.05, 0.1, 0.3, 0.45, 0.7, 0.95, 1.1, 1.05, 0.98, 1.0]
    cpr, cmd = mib_by_hand(MIB, f)
    assert float(circuit_performance_ratio(MIB, f)) == pytest.approx(cpr)
    assert float(circuit_model_distance(MIB, f)) == pytest.approx(cmd)
    # any order in, the same numbers; several curves at once ([..., N] -> [...])
    order = [3, 9, 0, 5, 1, 8, 2, 7, 4, 6]
    assert float(circuit_performance_ratio([MIB[i] for i in order], [f[i] for i in order])) == pytest.approx(cpr)
    batch = torch.tensor([f, [1.0] * 10])
    assert torch.allclose(circuit_performance_ratio(MIB, batch), torch.tensor([cpr, 0.999], dtype=torch.float64))
    assert torch.allclose(circuit_model_distance(MIB, batch), torch.tensor([cmd, 0.0], dtype=torch.float64))


def test_extra_sizes_are_left_out_on_mibs_grid():
    f = [0.05, 0.1, 0.3, 0.45, 0.7, 0.95, 1.1, 1.05, 0.98, 1.0]
    k = MIB + [0.3, 0.0005]
    ff = f + [100.0, -100.0]  # points between and below MIB's sizes: not MIB's number, not used
    x, y, how = mib_curve_points(k, ff)
    assert how == "grid" and x.tolist() == MIB and y.tolist() == f
    assert float(circuit_performance_ratio(k, ff)) == pytest.approx(mib_by_hand(MIB, f)[0])
    # sizes that equal MIB's up to float rounding (1 - 0.999 is not exactly 0.001) count as MIB's
    from_sparsities = [1 - s for s in (0.999, 0.998, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8, 0.5, 0.0)]
    assert mib_curve_points(from_sparsities, f)[2] == "grid"


def test_other_sizes_covering_the_range_are_integrated_as_measured():
    # 0.0005, 0.01, 1 with f = 0, 1, 1: f(0.001) = (0.001 - 0.0005) / (0.01 - 0.0005) by linear
    # interpolation, then the trapezoids from 0.001
    f_lo = 0.0005 / 0.0095
    x, y, how = mib_curve_points([0.0005, 0.01, 1.0], [0.0, 1.0, 1.0])
    assert how == "measured" and x.tolist() == [0.001, 0.01, 1.0]
    assert y.tolist() == pytest.approx([f_lo, 1.0, 1.0])
    cpr = 0.009 * (f_lo + 1) / 2 + 0.99
    assert float(circuit_performance_ratio([0.0005, 0.01, 1.0], [0.0, 1.0, 1.0])) == pytest.approx(cpr)
    assert float(circuit_model_distance([0.0005, 0.01, 1.0], [0.0, 1.0, 1.0])) == pytest.approx(0.009 * (1 - f_lo) / 2)
    # starting exactly at 0.001 but missing some of MIB's sizes: measured, no interpolation needed
    x, y, how = mib_curve_points([0.001, 0.1, 1.0], [0.2, 0.6, 1.0])
    assert how == "measured" and x.tolist() == [0.001, 0.1, 1.0] and y.tolist() == [0.2, 0.6, 1.0]


def test_sizes_short_of_the_range_give_no_value():
    k = [0.01, 0.02, 0.05, 1.0]  # the paper's grid: 1% and up
    x, y, how = mib_curve_points(k, [0.5, 0.6, 0.7, 1.0])
    assert how == "short" and len(x) == 0
    assert math.isnan(float(circuit_performance_ratio(k, [0.5, 0.6, 0.7, 1.0])))
    assert math.isnan(float(circuit_model_distance(k, [0.5, 0.6, 0.7, 1.0])))
    assert mib_curve_points([0.001, 0.5], [0.1, 0.9])[2] == "short"  # no point at 100%


def test_shape_contract():
    with pytest.raises(ValueError, match="kept must be"):
        circuit_performance_ratio(MIB, [1.0] * 9)
    with pytest.raises(ValueError, match="twice"):
        circuit_performance_ratio([0.001, 0.001, 1.0], [0.0, 0.0, 1.0])


def test_sparsities_mib_shorthand():
    from circuitbench.sweep import MIB_SPARSITIES, Sweep, parse_sparsities

    assert parse_sparsities("mib") == sorted(round(1 - k, 10) for k in MIB if k < 1) == list(MIB_SPARSITIES)
    assert Sweep.build(flags={"sparsities": "MIB"}).get("sparsities") == list(MIB_SPARSITIES)


# ---- the report and `circuitbench results` ----------------------------------------------------------------
F_MIB = {0.001: 0.0, 0.002: 0.05, 0.005: 0.1, 0.01: 0.3, 0.02: 0.5, 0.05: 0.8, 0.1: 0.9, 0.2: 1.1, 0.5: 1.0}


def _faithfulness(k: float) -> float:
    return F_MIB.get(round(k, 6), 0.5 + 0.5 * k)


@pytest.fixture(scope="module")
def mib_store(tmp_path_factory):
    """ioi-t1 on the tiny graph: eap on MIB's sizes (plus 0.7), acdc on the paper's, random on other
    sizes spanning 0.1% to 100%; logit differences chosen so the faithfulness is `_faithfulness`."""
    from test_report import EMPTY, FULL, TINY, TINY_MODEL, _job, _record, _scores

    from circuitbench.circuit import Circuit
    from circuitbench.store import ResultsStore
    from circuitbench.sweep import MIB_SPARSITIES

    root = tmp_path_factory.mktemp("mib")
    store = ResultsStore(root)
    grids = {"eap": tuple(MIB_SPARSITIES) + (0.3,), "acdc": (0.9, 0.95, 0.99), "random": (0.999, 0.9, 0.5)}
    for i, (method, grid) in enumerate(grids.items()):
        job = _job(f"{i + 1:016x}", method, "ioi-t1", TINY_MODEL, TINY, 200, 0, None, {"attribute": 1.0})
        sc = _scores(TINY, method)

        def metrics(s):
            ld = EMPTY["logit_diff"] + _faithfulness(1 - s) * (FULL["logit_diff"] - EMPTY["logit_diff"])
            return {"test": {"logit_diff": ld, "kl": 1.0 - s}}

        _record(store, job, {s: Circuit.from_sparsity(TINY, sc, s) for s in grid}, metrics, scores=sc.numpy())
    ref = {"ref_id": "ref-ioi", "task": "ioi-t1", "model": TINY_MODEL, "dtype": "float32", "device": "cpu",
           "data_seed": 0, "eval_limit": 32}
    store.record_references(ref, {"test": {"full": {"logit_diff": FULL["logit_diff"], "kl": 0.0},
                                           "empty": {"logit_diff": EMPTY["logit_diff"], "kl": 2.0}}})
    store.close()
    return root


def test_report_auc_table_has_cpr_and_cmd(mib_store):
    from circuitbench.report import tables
    from circuitbench.report.data import load_report_data

    data = load_report_data(mib_store)
    try:
        art = tables.auc_table(data)
    finally:
        data.store.close()
    t = art.table.set_index("method")
    k = MIB
    f = [F_MIB[x] for x in k[:-1]] + [1.0]  # the full model stands for 100%
    cpr, cmd = mib_by_hand(k, f)
    assert t.loc["eap", "cpr"] == pytest.approx(cpr) and t.loc["eap", "cmd"] == pytest.approx(cmd)
    assert t.loc["eap", "cpr/cmd points"] == "MIB grid"
    assert math.isnan(t.loc["acdc", "cpr"]) and t.loc["acdc", "cpr/cmd points"].startswith("n/a: sizes from 1%")
    kr = [0.001, 0.1, 0.5, 1.0]
    cpr_r, cmd_r = mib_by_hand(kr, [_faithfulness(x) for x in kr[:-1]] + [1.0])
    assert t.loc["random", "cpr"] == pytest.approx(cpr_r) and t.loc["random", "cmd"] == pytest.approx(cmd_r)
    points = t.loc["random", "cpr/cmd points"]
    assert points.startswith("measured: 4 sizes") and "not MIB's grid" in points
    assert "cpr" in art.caption and "MIB grid" in art.caption
    # the existing areas are still there, beside them
    assert {"auc_linear", "auc_log"} <= set(art.table.columns)


def test_results_command_shows_cpr_and_cmd(mib_store, capsys):
    assert main(["results", "--results", str(mib_store)]) == 0
    out = capsys.readouterr().out
    assert "MIB's CPR" in out and "MIB grid" in out and "n/a: sizes from 1%" in out
    line = next(ln for ln in out.splitlines() if " eap " in ln and "MIB grid" in ln)
    f = [F_MIB[x] for x in MIB[:-1]] + [1.0]
    assert f"{mib_by_hand(MIB, f)[0]:.4g}" in line
    assert main(["results", "--results", str(mib_store), "--json", "--method", "eap"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 10 and {r["cpr_cmd_points"] for r in rows} == {"MIB grid"}
    assert rows[0]["cpr"] == pytest.approx(mib_by_hand(MIB, f)[0])
    assert main(["results", "--results", str(mib_store), "--method", "acdc"]) == 0
    out = capsys.readouterr().out
    assert " eap " not in out and "acdc" in out
