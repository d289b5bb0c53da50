"""Training Edge Pruning across local processes for the tests (no torchrun): `discover_local` spawns
a gloo group of CPU processes, `train_edge_pruning` trains one circuit in this process, alone or as
one rank of a group (with the model whole or FSDP-sharded, `circuitbench.distributed`)."""
from __future__ import annotations

import os

import torch

from circuitbench.distributed import DataParallel, load_for_rank


def discover_local(world_size: int, spec: str, task: str, sparsity: float, n_train: int, preset: str = "smoke",
                   overrides: dict | None = None, seed: int = 0, data_seed: int = 0, folder=None,
                   fsdp: bool = False) -> list[dict]:
    """Edge Pruning data-parallel over ``world_size`` local CPU processes (gloo, no torchrun): each
    rank's learnt soft masks (the circuit's scores), circuit and training log, as
    ``[{"scores", "edges", "log"}, ...]`` by rank. ``fsdp``: the ranks shard the model's weights
    with FSDP (`circuitbench.distributed.shard_model`) instead of each holding the whole model. ``folder`` holds the
    rendezvous file and results (a temporary folder by default)."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        folder = str(folder or tmp)
        args = (world_size, folder, spec, task, sparsity, n_train, preset, dict(overrides or {}), seed, data_seed,
                fsdp)
        mp.spawn(_local_worker, args=args, nprocs=world_size, join=True)
        return [torch.load(os.path.join(folder, f"rank{r}.pt")) for r in range(world_size)]


def _local_worker(rank, world_size, folder, spec, task_name, sparsity, n_train, preset, overrides, seed, data_seed,
                  fsdp):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'rendezvous')}", rank=rank,
                            world_size=world_size)
    try:
        result = train_edge_pruning(spec, task_name, sparsity, n_train, preset, overrides, seed, data_seed,
                                    DataParallel(rank, world_size), fsdp=fsdp)
        torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def train_edge_pruning(spec: str, task_name: str, sparsity: float, n_train: int, preset: str = "smoke",
                       overrides: dict | None = None, seed: int = 0, data_seed: int = 0,
                       dp: DataParallel | None = None, device: str = "cpu", dtype=None, fsdp: bool = False) -> dict:
    """Train one Edge Pruning circuit in this process (as rank ``dp`` of a group, or alone):
    ``{"scores": soft masks [W, R], "edges": bool [W, R], "log": training log, "parameters_held":
    the model weights this process stores}``. ``fsdp``: shard the model over the (initialised)
    process group (`load_for_rank`)."""
    from circuitbench.method import get_method
    from circuitbench.tasks import get_task
    from circuitbench.tasks.base import DataSpec

    model, engine = load_for_rank(spec, device, dtype, fsdp, checkpoint=False)
    task = get_task(task_name)
    train = DataSpec(data_seed, n_train).build(task, model.tokenizer).train.to(model.device)
    cls = get_method("ep")
    method = cls(preset=preset, **(overrides or {}))
    method.data_parallel = dp
    result = method.discover(engine, task, train, None, [sparsity], seed=seed, progress=False)
    circuit = result.circuits[sparsity]
    held = sum((w.to_local() if hasattr(w, "to_local") else w).numel() for w in model.hf_model.parameters())
    return {"scores": circuit.scores, "edges": circuit.edges, "log": result.log, "parameters_held": held}
