"""Data-parallel Edge Pruning (two gloo processes = one process on the same global batches, with
the whole model on every process or FSDP-sharded over them), the FSDP adapter against the whole
model, the per-device memory estimate, and clean errors of the multi-device paths."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from circuitbench.costs import acdc_seconds, codellama_13b_config, estimate_memory
from circuitbench.adapters.sharded_llama import ShardedLlamaAdapter
from circuitbench.distributed import DataParallel, shard_model
from circuitbench.errors import UserError
from distributed_support import discover_local, train_edge_pruning

# ioi on the random Llama: the empty circuit's KL is ~0.25, so the masks' gradients are far from zero;
# masks start near 0.5 (log alpha 0.5) so every step's samples matter. Global batch 5 over 2 ranks:
# shards of 3 and 2, and a last batch of 2 (12 examples) -- unequal shards are weighted correctly.
SETUP = dict(spec="random:llama-tiny", task="ioi", sparsity=0.5, n_train=12, preset="smoke",
             overrides={"steps": 8, "batch_size": 5, "ramp_steps": 4, "init_log_alpha": 0.5, "lr": 0.1})


@pytest.fixture(scope="module")
def single():
    """Edge Pruning in this process alone, with the whole model, on SETUP's global batches."""
    torch.set_num_threads(1)
    return train_edge_pruning(SETUP["spec"], SETUP["task"], SETUP["sparsity"], SETUP["n_train"], SETUP["preset"],
                              SETUP["overrides"])


def _same_masks_as_one_process(ranks, single):
    init = torch.sigmoid(torch.tensor(0.5))  # roughly where the soft masks started
    moved = (single["scores"] - init).nan_to_num().abs().max()
    assert moved > 1e-2, "the masks barely moved: the comparison would be vacuous"
    for r in ranks:
        assert torch.allclose(r["scores"].nan_to_num(), single["scores"].nan_to_num(), atol=1e-5, rtol=1e-5)
        assert torch.equal(r["edges"], single["edges"])
        # the logged KL is the global batch's mean, the same as one process's
        kl_dp = torch.tensor([row["kl"] for row in r["log"]])
        kl_one = torch.tensor([row["kl"] for row in single["log"]])
        assert torch.allclose(kl_dp, kl_one, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # two spawned processes importing torch and transformers: ~30 s on 2 busy cores
def test_two_gloo_processes_learn_the_masks_of_one_process(single):
    ranks = discover_local(2, **SETUP)
    _same_masks_as_one_process(ranks, single)
    assert all(r["parameters_held"] == single["parameters_held"] for r in ranks)  # whole model everywhere


@pytest.mark.slow  # the same with FSDP's all-gathers in every pass: ~20 s on 2 busy cores
def test_two_gloo_processes_with_fsdp_learn_the_masks_of_one_process(single):
    ranks = discover_local(2, **SETUP, fsdp=True)
    _same_masks_as_one_process(ranks, single)
    # each rank stores only its shard of the weights: half of them (FSDP pads odd dimensions)
    held = [r["parameters_held"] for r in ranks]
    assert all(h < 0.6 * single["parameters_held"] for h in held)
    assert sum(held) >= single["parameters_held"]


def test_shards_cover_the_global_batch_and_stand_ins_weigh_nothing():
    part = torch.tensor([7, 3, 9])
    shards = [DataParallel(r, 2).shard(part) for r in range(2)]
    assert sorted(torch.cat(shards).tolist()) == [3, 7, 9]
    small = torch.tensor([4])
    assert DataParallel(1, 2).shard(small).tolist() == [4]  # a stand-in so the rank still runs the pass
    assert DataParallel(1, 2).weight(small) == 0.0 and DataParallel(0, 2).weight(small) == 1.0


def test_batch_smaller_than_the_group_is_a_clear_error():
    with pytest.raises(UserError, match="cannot be split over 4 processes"):
        train_edge_pruning("random:llama-tiny", "ioi", 0.5, 4, "smoke", {"batch_size": 2, "steps": 1},
                           dp=DataParallel(0, 4))


def test_codellama_13b_estimate_is_sane():
    cfg = codellama_13b_config()
    one = estimate_memory(cfg, 1, 1, 128, "bfloat16", True)
    assert 12.8e9 < one["parameters"] < 13.1e9
    assert one["edges"] == 3_877_661  # this harness's edge convention (the paper counts 3,872,820)
    assert 24e9 < one["weights"] < 27e9  # 13B bf16 parameters, unsharded
    no_ckpt = estimate_memory(cfg, 1, 1, 128, "bfloat16", False)
    assert no_ckpt["activations"] > 5 * one["activations"]  # checkpointing keeps one layer's worth
    assert no_ckpt["total"] > one["total"]
    sharded = estimate_memory(cfg, 32, 1, 128, "bfloat16", True)
    assert sharded["weights"] < one["weights"] / 10  # 1/32 of the weights plus two gathered units
    assert sharded["total"] < one["total"]
    # the stack grows with the tokens; float32 doubles the model-dtype tensors
    assert estimate_memory(cfg, 32, 2, 128, "bfloat16", True)["writer_stack"] == 2 * sharded["writer_stack"]
    assert estimate_memory(cfg, 32, 1, 128, "float32", True)["writer_stack"] == 2 * sharded["writer_stack"]
    acdc = acdc_seconds(cfg, 100, 128, 1e14)
    assert acdc["trials"] == one["edges"] and acdc["total_s"] > 86400  # days, not hours
    with pytest.raises(UserError):
        estimate_memory(cfg, 0, 1, 128, "bfloat16", True)


def test_configs_known_offline():
    from circuitbench.models import ModelSpec

    assert ModelSpec.parse("random:llama-tiny").config().num_hidden_layers == 2
    assert ModelSpec.parse("smollm2-135m").config().num_key_value_heads == 3
    assert ModelSpec.parse("codellama/CodeLlama-13b-Instruct-hf").config().hidden_size == 5120
    assert ModelSpec.parse("tracr:reverse").config() is None


def test_fsdp_without_a_process_group_is_a_clear_error():
    from circuitbench import load_model

    with pytest.raises(UserError, match="process group"):
        shard_model(load_model("random:llama-tiny"), "cpu")


def test_fsdp_adapter_matches_the_whole_model(gloo_group):
    """The FSDP units (one rank: all-gathers of a single shard) compute what the unsharded adapter
    computes: logits of the masked pass, gradients of the masks (with and without gradient
    checkpointing), the full model's logits and a pass without autograd."""
    from circuitbench import load_model
    from circuitbench.engine import MaskedModel

    torch.manual_seed(0)
    whole = load_model("random:llama-tiny")
    sharded = shard_model(load_model("random:llama-tiny"), "cpu")
    assert isinstance(sharded.adapter, ShardedLlamaAdapter)
    assert type(next(sharded.hf_model.parameters())).__name__ == "DTensor"
    g = whole.graph
    clean = torch.randint(0, 1000, (2, 7))
    corrupted = torch.randint(0, 1000, (2, 7))
    positions = torch.tensor([[6], [4]])
    mask = torch.rand(g.n_writers, g.n_readers)
    mask[:, 3] = 0.0  # some dead readers as well
    for checkpoint in (False, True):
        out = []
        for model in (whole, sharded):
            edge = mask.clone().requires_grad_(True)
            eng = MaskedModel(model, checkpoint=checkpoint)
            logits = eng(clean, corrupted, edge_mask=edge, positions=positions)
            logits.float().logsumexp(-1).sum().backward()
            out.append((logits.detach(), edge.grad))
        (l0, g0), (l1, g1) = out
        assert torch.allclose(l0, l1, atol=1e-5, rtol=1e-5)
        assert g0.abs().max() > 0 and torch.allclose(g0, g1, atol=1e-5, rtol=1e-4)
    ref = [MaskedModel(m).reference(clean, positions=positions) for m in (whole, sharded)]
    assert torch.allclose(ref[0], ref[1], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        nograd = [MaskedModel(m)(clean, corrupted, edge_mask=mask, positions=positions) for m in (whole, sharded)]
    assert torch.allclose(nograd[0], nograd[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="Llama-family"):
        shard_model(load_model("random:gpt2-tiny"), "cpu")


def test_dry_run_prints_the_codellama_estimate_without_loading():
    out = subprocess.run([sys.executable, "-m", "circuitbench.distributed", "--casestudy", "boolexpr",
                          "--model", "codellama/CodeLlama-13b-Instruct-hf", "--preset", "paper", "--nproc", "32",
                          "--checkpoint", "--dry-run"], capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr
    assert "memory per device, codellama/CodeLlama-13b-Instruct-hf" in out.stdout
    assert "3,877,661 edges" in out.stdout and "ACDC" in out.stdout


def test_without_torchrun_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "circuitbench.distributed", "--task", "ioi", "--model",
                          "random:llama-tiny", "--sparsities", "0.5"], capture_output=True, text=True, timeout=400,
                         env={k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE")})
    assert out.returncode == 2
    assert "torchrun" in out.stderr.strip().splitlines()[-1]


def test_results_folder_flag_reaches_a_task_sweep():
    from circuitbench.distributed import _parser, _sweep_from_args

    args = _parser().parse_args(["--task", "ioi", "--model", "random:llama-tiny", "--sparsities", "0.5",
                                 "--results", "elsewhere", "--fsdp"])
    assert _sweep_from_args(args, "cpu").get("results") == "elsewhere"


def test_torchrun_executor_runs_the_runners_plan(gloo_group, tmp_path):
    """`circuitbench.distributed.run_jobs` (what torchrun's ranks run) plans through the one runner:
    rank 0 plans against the store, every rank runs the same units (the job, and the references the
    report normalises against), rank 0 records them; a second launch finds nothing left to run."""
    import io

    from circuitbench.distributed import DataParallel, _parser, _sweep_from_args, run_jobs
    from circuitbench.store import ResultsStore

    results = str(tmp_path / "r")
    args = _parser().parse_args(["--task", "ioi", "--model", "random:llama-tiny", "--sparsities", "0.5",
                                 "--n-train", "8", "--eval-limit", "8", "--method-preset", "smoke",
                                 "--set", "ep.steps=2", "--set", "ep.batch_size=4", "--results", results])
    sweep = _sweep_from_args(args, "cpu")
    out = io.StringIO()
    assert run_jobs(sweep, DataParallel(0, 1), "cpu", "float32", results, progress=False, out=out) == 0
    assert "1 jobs planned, 0 already complete" in out.getvalue() and "running 2 units" in out.getvalue()
    store = ResultsStore(results)
    runs = store.runs(with_metrics=True)
    assert len(runs) == 1 and runs["status"].eq("complete").all() and "test/kl" in runs
    job_id = runs["job_id"].iloc[0]
    assert store.job_status([job_id]) == {job_id: "complete"}
    assert len(store.reference_metrics(task="ioi")) > 0  # the full model's and the empty circuit's metrics
    store.close()
    again = io.StringIO()
    assert run_jobs(sweep, DataParallel(0, 1), "cpu", "float32", results, progress=False, out=again) == 0
    assert "1 jobs planned, 1 already complete" in again.getvalue() and "running 0 units" in again.getvalue()
