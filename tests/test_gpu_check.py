"""What of the GPU check runs on a CPU: ``scripts/gpu-check`` (its --cpu-dry path, and its plain
refusal without a GPU), the synthetic tokenizer random models use offline, ``random:codellama-13b``
without allocating its weights, and the benchmarks' device and ep-step options."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from circuitbench import models
from circuitbench.errors import UserError

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu-check"


@pytest.fixture
def synthetic(monkeypatch):
    monkeypatch.setenv(models.RANDOM_TOKENIZER_ENV, "synthetic")


def test_script_cpu_dry_run_exercises_every_part(tmp_path):
    """~30 s on 2 busy cores: the cuda tests are collected and skip, each benchmark and the
    ep-step run at tiny sizes on the CPU, and the summary holds every part."""
    out = tmp_path / "summary.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(SCRIPT), "--cpu-dry", "--out", str(out)], capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    s = json.loads(out.read_text())
    assert s["mode"] == "cpu-dry" and s["passed"] is True
    assert set(s["parts"]) == {"tests", "bench_engine", "bench_methods", "codellama_13b"}
    tests = s["parts"]["tests"]
    assert tests["counts"]["skipped"] == len(tests["tests"]) >= 10 and tests["skip_reasons"] == ["no CUDA device"]
    h = s["headline"]
    for key in ("masked_over_plain", "ep_step_over_plain", "acdc_trial_over_plain_forward", "eap_over_plain"):
        assert h["ratios"][key] > 0
    assert h["seconds"]["ep_step_s"] > 0 and h["seconds"]["engine_masked_s"] > 0
    assert h["codellama_13b"]["estimate_gib"] is not None
    assert "memory per device" in s["parts"]["codellama_13b"]["dry_run_estimate"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA: checks the no-GPU refusal "
                                                      "of scripts/gpu-check (issue 18)")
def test_script_without_a_gpu_says_it_needs_one(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "s.json")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2
    assert "needs a CUDA GPU" in r.stderr and "--cpu-dry" in r.stderr
    assert json.loads((tmp_path / "s.json").read_text())["passed"] is False


def test_script_is_executable():
    assert os.access(SCRIPT, os.X_OK)


# ---- the synthetic tokenizer ------------------------------------------------------------------------
@pytest.mark.parametrize("task,variant", [("ioi", None), ("ioi-t1", None), ("gp", None), ("gt", "first-digit"),
                                          ("boolexpr-ip", "codellama-inst"), ("boolexpr-fs", "codellama-inst")])
def test_synthetic_tokenizer_builds_every_generated_task(synthetic, task, variant):
    from circuitbench.tasks import get_task

    model = models.load_model("random:llama-tiny")
    tok = model.tokenizer
    assert tok.name_or_path == "circuitbench-synthetic"
    splits = get_task(task).build(tok, seed=0, sizes={"train": 16, "validation": 4, "test": 8})
    assert splits.variant == variant
    assert len(splits.train) == 16 and sum(splits.dropped.values()) == 0
    assert int(splits.train.clean.max()) < model.hf_model.config.vocab_size


def test_synthetic_tokenizer_has_single_token_names_and_any_text():
    from circuitbench.models.synthetic_tokenizer import synthetic_tokenizer

    tok = synthetic_tokenizer()
    assert len(tok(" Mary", add_special_tokens=False)["input_ids"]) == 1
    assert len(tok(" 1732", add_special_tokens=False)["input_ids"]) == 5  # " " and one token per digit
    text = "Zürich's 3 naïve ☃ cafés"  # unknown words fall back to bytes, and decode back
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert len(tok) < min(kw.get("vocab_size", 10**9) for _, kw in models.RANDOM_SHAPES.values())


def test_random_tokenizer_choice(monkeypatch):
    from circuitbench.models.synthetic_tokenizer import synthetic_tokenizer

    monkeypatch.delenv(models.RANDOM_TOKENIZER_ENV, raising=False)
    assert models._random_tokenizer_loader("gpt2-tiny") is not synthetic_tokenizer  # SmolLM2's by default
    assert models._random_tokenizer_loader("codellama-13b") is synthetic_tokenizer  # always: vocab 32,016
    monkeypatch.setenv(models.RANDOM_TOKENIZER_ENV, "synthetic")
    assert models._random_tokenizer_loader("gpt2-tiny") is synthetic_tokenizer
    monkeypatch.setenv(models.RANDOM_TOKENIZER_ENV, "bpe-of-my-own")
    with pytest.raises(UserError, match="smollm2 or synthetic"):
        models.load_model("random:gpt2-tiny")


# ---- random:codellama-13b without its weights --------------------------------------------------------
def test_codellama_13b_graph_without_loading(monkeypatch, capsys):
    from circuitbench.cli import main

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("graph loaded the weights"))
    assert main(["graph", "--model", "random:codellama-13b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["layers"], out["heads"], out["edges"]) == (40, 40, 3_877_661)
    from circuitbench.costs import codellama_13b_config

    cfg = codellama_13b_config()
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_key_value_heads) == (5120, 13824, 32016, 40)


def test_codellama_13b_that_does_not_fit_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(models, "_free_bytes", lambda device: 2**30)
    with pytest.raises(UserError, match=r"random:codellama-13b needs 24\.\d GiB .* bfloat16 on cpu; only 1\.0 GiB"):
        models.load_model("random:codellama-13b", dtype="bfloat16")


def test_large_random_shapes_are_built_on_the_device_in_their_dtype(monkeypatch):
    """The on-device path (what random:codellama-13b takes), on a small shape: the target dtype from
    the start, seeded, and the process's default dtype and random state left alone."""
    monkeypatch.setitem(models.RANDOM_SHAPES, "llama-tiny-on-device", models.RANDOM_SHAPES["llama-tiny"])
    monkeypatch.setattr(models, "RANDOM_ON_DEVICE", ("llama-tiny-on-device",))
    state = torch.random.get_rng_state()
    a = models.load_model("random:llama-tiny-on-device", dtype="bfloat16", seed=3)
    b = models.load_model("random:llama-tiny-on-device", dtype="bfloat16", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state) and torch.get_default_dtype() == torch.float32
    assert {p.dtype for p in a.hf_model.parameters()} == {torch.bfloat16}
    assert all(torch.equal(p, q) for p, q in zip(a.hf_model.parameters(), b.hf_model.parameters()))
    assert a.graph == models.random_graph("llama-tiny")


# ---- benchmarks: devices and the ep-step target ------------------------------------------------------
def test_ep_step_benchmark_reports_time_memory_and_estimate():
    from methods.benchmarks import ep_step_benchmark

    r = ep_step_benchmark("random:llama-tiny", batch=1, seq=12, threads=1, repeats=1, progress=False,
                          dtype="bfloat16", checkpoint=True)
    assert (r["device"], r["dtype"], r["checkpoint"]) == ("cpu", "bfloat16", True)
    assert r["ep_step_s"] == r["ep_step_s"] and r["setup_s"] >= 0
    assert r["estimate_total_mib"] > r["estimate_weights_mib"] > 0
    assert r["weights_mib"] == pytest.approx(r["estimate_weights_mib"], rel=0.05)


def test_bench_on_a_missing_gpu_is_a_clear_error(capsys):
    from circuitbench.cli import main

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA: checks the no-GPU error of bench --device cuda (issue 18)")
    assert main(["bench", "engine", "--device", "cuda"]) != 0
    assert "CUDA is not available" in capsys.readouterr().err


def test_timer_synchronises_only_on_cuda(monkeypatch):
    from circuitbench import bench

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    assert bench.timed(lambda: None, "cpu") >= 0 and calls == []
    bench.timed(lambda: None, "cuda:0")
    assert calls == ["cuda:0", "cuda:0"]  # before and after the timed region
    assert bench.median_seconds(lambda: None, 3, "cuda:0") >= 0 and len(calls) == 2 + 2 * 3
