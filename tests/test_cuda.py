"""The CUDA path. Marked ``cuda``; without a GPU every test skips with the reason "no CUDA device"
(CI on CPU stays green); ``scripts/gpu-check`` runs them on a GPU machine.

- the engine on CUDA in float32: all masks 1 = the Hugging Face model's logits (all 0 = the
  corrupted run's), one edge removed = a hand-written hook patch (tests/test_engine.py's
  `_Patcher`), and a circuit's metrics equal to the CPU's within 1e-4;
- bfloat16 mask gradients (with gradient checkpointing) within 5% relative L2 of float32's;
- every registered method's smoke run through the CLI on random:gpt2-small and random:llama-tiny
  with ``--device cuda``, each job's CUDA peak memory recorded in the store;
- FSDP2 over NCCL with one process: the sharded adapter computes what the whole model computes,
  Edge Pruning learns the same masks, and a ``torchrun`` launch records its job.

Random models use the synthetic tokenizer here (``CIRCUITBENCH_RANDOM_TOKENIZER=synthetic``): a
GPU machine may have no network to fetch SmolLM2's.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from circuitbench import MaskedModel, load_model

sys.path.insert(0, str(Path(__file__).parent))
from test_engine import BF16_TOLERANCE, _Patcher, _readers_to_test  # noqa: E402

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

SPECS = ["random:gpt2-tiny", "random:llama-tiny"]
SMOKE_MODELS = ["random:gpt2-small", "random:llama-tiny"]
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def offline_tokenizer():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIRCUITBENCH_RANDOM_TOKENIZER", "synthetic")
        yield


@pytest.fixture(scope="module", params=SPECS)
def pair(request):
    """The same seeded random model on the CPU and on CUDA, float32."""
    return load_model(request.param), load_model(request.param, device="cuda")


def _batch(seed=0, B=3, S=7, vocab=1000, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g), torch.randint(0, vocab, (B, S), generator=g)
    return tuple(t.to(device) for t in ids)


# ---- the engine on CUDA ---------------------------------------------------------------------------
def test_all_ones_is_the_model_and_all_zeros_the_corrupted_run(pair):
    _, model = pair
    g, hf = model.graph, model.hf_model
    clean, corrupted = _batch()
    mm = MaskedModel(model)
    with torch.no_grad():
        want, want_corrupted = hf(clean).logits, hf(corrupted).logits
    got = mm(clean, corrupted, edge_mask=g.full_mask().cuda().requires_grad_(True))  # the autograd path
    assert got.device.type == "cuda"
    assert (got - want).abs().max().item() <= TOL
    with torch.no_grad():  # the pruned pass (evaluation, ACDC) and the uniform-mask read
        assert (mm(clean, corrupted, edge_mask=g.full_mask().cuda()) - want).abs().max().item() <= TOL
        assert (mm(clean, corrupted) - want).abs().max().item() <= TOL
    zeros = mm(clean, corrupted, edge_mask=torch.zeros(g.n_writers, g.n_readers, device="cuda"))
    assert (zeros - want_corrupted).abs().max().item() <= TOL
    pos = torch.tensor([[6, 0], [3, 5], [2, 2]], device="cuda")
    cached = mm(clean, positions=pos, corrupted=mm.corrupted_cache(corrupted))
    assert (cached - want[torch.arange(3, device="cuda")[:, None], pos]).abs().max().item() <= TOL


@pytest.mark.parametrize("ablation", ["interchange", "zero"])
def test_one_edge_removed_equals_activation_patch(pair, ablation):
    _, model = pair
    g = model.graph
    clean, corrupted = _batch(4)
    mm = MaskedModel(model)
    patcher = _Patcher(model)
    clean_out = patcher.writer_outputs(clean)
    corr_out = patcher.writer_outputs(corrupted)
    with torch.no_grad():
        full = model.hf_model(clean).logits
    for reader in _readers_to_test(g):
        for writer in ["input", "a0.h2", "m0"]:
            w, r = g.parse_edge(f"{writer}->{reader}")
            delta = clean_out[writer] - (corr_out[writer] if ablation == "interchange" else 0)
            want = patcher.patched_logits(clean, reader, delta)
            mask = g.full_mask().cuda()
            mask[w, r] = 0
            got = mm(clean, corrupted, edge_mask=mask, ablation=ablation)
            assert (want - full).abs().max() > 1e-3, (writer, reader)  # the patch matters
            assert (got - want).abs().max().item() <= TOL, (writer, reader, ablation)


@pytest.mark.parametrize("task", ["ioi", "boolexpr-ip"])
def test_circuit_metrics_equal_the_cpu_ones(pair, task):
    from circuitbench.bench import sparse_circuit
    from circuitbench.circuit import Circuit
    from circuitbench.evaluate import evaluate

    cpu, gpu = pair
    circuit = Circuit(cpu.graph, sparse_circuit(cpu.graph, seed=1, node_share=0.6, edge_share=0.3).bool())
    want = evaluate(cpu, task, circuit, limit=32, progress=False, references=True)
    got = evaluate(gpu, task, circuit, limit=32, progress=False, references=True)
    assert set(got) == set(want) and want["n_examples"] == 32
    for key, value in want.items():
        assert abs(got[key] - value) <= TOL, (key, got[key], value)


# ---- bfloat16 ---------------------------------------------------------------------------------------
def _mask_grads(model, checkpoint):
    g = model.graph
    clean, corrupted = _batch(8, B=4, S=9)
    mm = MaskedModel(model, checkpoint=checkpoint)
    gen = torch.Generator().manual_seed(1)
    edge = torch.rand(g.n_writers, g.n_readers, generator=gen).cuda().requires_grad_(True)
    node = torch.rand(g.n_writers, generator=gen).cuda().requires_grad_(True)
    pos = torch.full((4,), 8, device="cuda")
    ref = mm.reference(clean, positions=pos).float().log_softmax(-1)
    out = mm(clean, corrupted, edge_mask=edge, node_mask=node, positions=pos)
    loss = torch.nn.functional.kl_div(out.float().log_softmax(-1), ref, log_target=True, reduction="batchmean")
    loss.backward()
    return edge.grad[g.valid.cuda()], node.grad


def test_bf16_mask_gradients_within_tolerance_of_float32(pair):
    _, model = pair
    e0, n0 = _mask_grads(model, checkpoint=False)
    low = load_model(model.spec, device="cuda", dtype="bfloat16")
    e1, n1 = _mask_grads(low, checkpoint=True)
    for a, b in ((e0, e1), (n0, n1)):
        assert a.abs().sum() > 0
        rel = (a - b.float()).norm() / a.norm()
        assert rel <= BF16_TOLERANCE, rel.item()


# ---- FSDP2 over NCCL ---------------------------------------------------------------------------------
@pytest.fixture
def nccl_group(tmp_path):
    """A process group of this process alone (NCCL on GPU 0), destroyed after the test."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.fail("a process group is already initialised in this process")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp_over_nccl_matches_the_whole_model(nccl_group):
    from circuitbench.distributed import ShardedLlamaAdapter, load_for_rank

    whole, _ = load_for_rank("random:llama-tiny", "cuda:0", "float32", fsdp=False, checkpoint=False)
    sharded, _ = load_for_rank("random:llama-tiny", "cuda:0", "float32", fsdp=True, checkpoint=False)
    assert isinstance(sharded.adapter, ShardedLlamaAdapter)
    assert type(next(sharded.hf_model.parameters())).__name__ == "DTensor"
    g = whole.graph
    clean, corrupted = _batch(9, B=2, S=7)
    positions = torch.tensor([[6], [4]], device="cuda")
    mask = torch.rand(g.n_writers, g.n_readers, generator=torch.Generator().manual_seed(0)).cuda()
    mask[:, 3] = 0.0
    for checkpoint in (False, True):
        out = []
        for model in (whole, sharded):
            edge = mask.clone().requires_grad_(True)
            logits = MaskedModel(model, checkpoint=checkpoint)(clean, corrupted, edge_mask=edge, positions=positions)
            logits.float().logsumexp(-1).sum().backward()
            out.append((logits.detach(), edge.grad))
        (l0, g0), (l1, g1) = out
        assert l1.device.type == "cuda"
        assert torch.allclose(l0, l1, atol=1e-5, rtol=1e-5)
        assert g0.abs().max() > 0 and torch.allclose(g0, g1, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        nograd = [MaskedModel(m)(clean, corrupted, edge_mask=mask, positions=positions) for m in (whole, sharded)]
    assert torch.allclose(nograd[0], nograd[1], atol=1e-5, rtol=1e-5)


def test_edge_pruning_over_nccl_learns_the_masks_of_one_process(nccl_group):
    from circuitbench.distributed import DataParallel
    from distributed_support import train_edge_pruning

    args = ("random:llama-tiny", "ioi", 0.5, 12, "smoke",
            {"steps": 8, "batch_size": 5, "ramp_steps": 4, "init_log_alpha": 0.5, "lr": 0.1})
    alone = train_edge_pruning(*args, device="cuda:0")
    ranked = train_edge_pruning(*args, dp=DataParallel(0, 1), device="cuda:0", fsdp=True)
    moved = (alone["scores"] - torch.sigmoid(torch.tensor(0.5))).nan_to_num().abs().max()
    assert moved > 1e-2, "the masks barely moved: the comparison would be vacuous"
    assert torch.allclose(ranked["scores"].nan_to_num(), alone["scores"].nan_to_num(), atol=1e-4, rtol=1e-4)
    # CUDA kernels may sum in another order: allow a rare flip of an edge sitting on the threshold
    assert (ranked["edges"] != alone["edges"]).float().mean() <= 1e-3
    kl = [torch.tensor([row["kl"] for row in r["log"]]) for r in (alone, ranked)]
    assert torch.allclose(kl[0], kl[1], rtol=1e-3, atol=1e-5)


def test_torchrun_with_nccl_and_fsdp_records_the_job(tmp_path):
    from circuitbench.store import ResultsStore

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "circuitbench.distributed", "--task", "ioi", "--model", "random:llama-tiny", "--sparsities", "0.5",
           "--method-preset", "smoke", "--n-train", "8", "--eval-limit", "8", "--fsdp", "--checkpoint",
           "--results", str(tmp_path), "--no-progress"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=dict(os.environ))
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-4000:])
    store = ResultsStore(tmp_path)
    try:
        df = store.runs()
    finally:
        store.close()
    assert len(df) == 1 and df["device"].iloc[0].startswith("cuda")
    assert df["peak_memory_mib"].notna().all()


def test_dry_run_estimates_for_cuda(capsys):
    from circuitbench.cli import main

    code = main(["run", "--preset", "smoke", "--methods", "ep,acdc,eap", "--models", "random:codellama-13b",
                 "--device", "cuda", "--dtype", "bfloat16", "--dry-run", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "memory per device, random:codellama-13b" in out and "3,877,661 edges" in out


# ---- every method through the runner (last: the longest) ---------------------------------------
def test_every_method_smoke_run_on_cuda_records_peak_memory(tmp_path):
    from circuitbench.cli import main
    from circuitbench.method import list_methods
    from circuitbench.store import ResultsStore

    methods = sorted(list_methods())
    code = main(["run", "--preset", "smoke", "--methods", ",".join(methods), "--models", ",".join(SMOKE_MODELS),
                 "--device", "cuda", "--results", str(tmp_path), "--no-progress"])
    assert code == 0
    store = ResultsStore(tmp_path)
    try:
        df = store.runs(status=None)
        refs = store.reference_metrics()
    finally:
        store.close()
    assert set(df["method"]) == set(methods) and set(df["model"]) == set(SMOKE_MODELS)
    assert df["status"].eq("complete").all(), df[df["status"] != "complete"][["method", "model", "error"]]
    assert df["device"].str.startswith("cuda").all()
    assert df["peak_memory_mib"].notna().all() and df["peak_memory_mib"].ge(0).all()
    # the methods that run the model on the GPU allocate there
    assert df[df["method"] != "random"]["peak_memory_mib"].gt(0).all()
    assert set(refs["model"]) == set(SMOKE_MODELS)
