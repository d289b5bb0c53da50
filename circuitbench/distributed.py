"""Edge Pruning across processes and devices: the process group (data-parallel mask training), the
FSDP sharding of the frozen model over it, and the torchrun executor of the runner's jobs. The
sharded adapter is `circuitbench.adapters.sharded_llama`; the memory estimate per device is
`circuitbench.costs`; the helpers that train across local processes in the tests are
``tests/distributed_support.py``.

Data parallelism. Every process (rank) holds the same log alphas and Lagrange multipliers. Each
step, every rank takes the same global batch of the seeded partition (the one a single process
would take), runs the masked pass on its shard of it (examples ``rank::world_size``), and the
gradients of the log alphas and lambdas are summed across ranks with one all-reduce before the
optimiser step, each shard's KL weighted by its share of the global batch. Mask samples come from
the same seeded generator on every rank, so each rank takes the step one process would take on
the whole batch and the masks stay identical (``tests/test_distributed.py`` checks this against a
single process on CPU with the gloo backend).

Sharding the frozen model (``--fsdp``). The model's weights are split over the ranks with PyTorch
FSDP2 (``torch.distributed.fsdp.fully_shard``), one unit per attention block, MLP block,
embedding and unembedding, run by `circuitbench.adapters.sharded_llama.ShardedLlamaAdapter`
(`shard_model` puts it on a loaded model): each unit's weights are gathered just before use and
freed after. It runs on GPUs (NCCL) and on CPU processes (gloo). ``tests/test_distributed.py``
checks on CPU that two gloo processes training Edge Pruning on the sharded model learn the masks
one process learns with the whole model. Llama-family models only (CodeLlama, SmolLM2,
Mistral-style).

Launching (``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous)::

    # one node, N GPUs: the case study's two circuits on CodeLlama-13B-Instruct
    torchrun --nproc_per_node N -m circuitbench.distributed --casestudy boolexpr \\
        --model codellama/CodeLlama-13b-Instruct-hf --preset paper --fsdp --results results
    # then evaluate both circuits in both settings and their intersection (one GPU, resumable)
    circuitbench casestudy boolexpr --model codellama/CodeLlama-13b-Instruct-hf --preset paper \\
        --device cuda --results results

    # several nodes (run on every node; NODE = 0..M-1, HOST:PORT = node 0's address)
    torchrun --nnodes M --nproc_per_node N --node_rank NODE --rdzv_backend c10d \\
        --rdzv_endpoint HOST:29500 --rdzv_id casestudy -m circuitbench.distributed \\
        --casestudy boolexpr --model codellama/CodeLlama-13b-Instruct-hf --preset paper --fsdp

    # any Edge Pruning sweep, data-parallel over CPU processes (gloo) or GPUs (add --fsdp to shard
    # the model over the processes as well)
    torchrun --nproc_per_node 2 -m circuitbench.distributed --task gt --model random:llama-tiny \\
        --sparsities 0.9 --method-preset smoke

Every rank runs each job (discovery and evaluation, so FSDP's collectives line up); rank 0 writes
the results store, whose records are those of `circuitbench run` (same job ids: a job finished
here is complete for `circuitbench run` and `circuitbench casestudy` too). ``--dry-run`` prints
the plan and the memory estimate per device (`circuitbench.costs.estimate_memory`) without
loading anything.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, replace

import torch

from .errors import UserError


# ---- the process group --------------------------------------------------------------------------------
@dataclass
class DataParallel:
    """This process's place in a data-parallel group: how to shard a batch and sum gradients."""

    rank: int
    world_size: int
    group: object = None  # a torch.distributed process group; None: the default one

    def shard(self, part: torch.Tensor) -> torch.Tensor:
        """This rank's examples of a global batch (indices ``part``): ``part[rank::world_size]``. A
        batch too small to give this rank an example gives it the first one as a stand-in, whose
        weight is 0 (the rank still runs the pass, so collectives stay in step)."""
        mine = part[self.rank::self.world_size]
        return mine if len(mine) else part[:1]

    def weight(self, part: torch.Tensor) -> float:
        """1 when this rank has real examples of the global batch ``part``, 0 for a stand-in."""
        return 1.0 if self.rank < len(part) else 0.0

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the group, in place."""
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)

    def broadcast_object(self, obj, src: int = 0):
        """Rank ``src``'s ``obj`` (picklable: e.g. a state of CPU tensors) on every rank of the group
        (Edge Pruning's checkpoint: rank 0 reads it, every rank resumes from it)."""
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]


def init_from_env(backend: str | None = None) -> tuple[DataParallel, str]:
    """Join the process group torchrun describes in the environment; returns (DataParallel, device).

    Backend: NCCL with one GPU per local rank when CUDA is available, else gloo on CPU."""
    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UserError("no torchrun environment (RANK, WORLD_SIZE): launch with "
                        "`torchrun --nproc_per_node N -m circuitbench.distributed ...`")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DataParallel(dist.get_rank(), dist.get_world_size()), device


# ---- FSDP sharding of the frozen model (NCCL on GPUs, gloo on CPU) -----------------------------------
def shard_model(model, device: str):
    """Shard a loaded Llama-family model's weights over the process group with FSDP, in place (the
    `LoadedModel` keeps its graph and tokenizer and gets a `ShardedLlamaAdapter`). ``device``: this
    rank's GPU (``cuda:N``, NCCL group) or ``cpu`` (gloo group)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise UserError("--fsdp shards the model over a process group: launch with "
                        "`torchrun --nproc_per_node N -m circuitbench.distributed ... --fsdp`")
    kind = torch.device(device).type
    backend = dist.get_backend()
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--fsdp on {device}: CUDA is not available on this machine")
    if {"cpu": "gloo", "cuda": "nccl"}.get(kind, "-") not in backend:
        raise UserError(f"--fsdp runs on GPUs (NCCL) or CPU processes (gloo), not on {device} with the "
                        f"{backend} backend")
    if getattr(model.adapter, "family", None) != "llama":
        raise UserError(f"--fsdp supports Llama-family models; {model.spec} is {model.adapter.family}")
    from .adapters.sharded_llama import ShardedLlamaAdapter

    model.adapter = ShardedLlamaAdapter(model.hf_model, device)
    return model


# ---- running jobs --------------------------------------------------------------------------------------
def load_for_rank(spec: str, device: str, dtype: str, fsdp: bool, checkpoint: bool):
    """(LoadedModel, MaskedModel) for this rank: the whole model, or FSDP-sharded with ``fsdp``."""
    from .engine import MaskedModel
    from .models import load_model

    if fsdp:
        model = load_model(spec, device="cpu", dtype=dtype)  # sharded onto the device unit by unit
        model.device = torch.device(device)
        shard_model(model, device)
    else:
        model = load_model(spec, device=device, dtype=dtype)
    return model, MaskedModel(model, checkpoint=checkpoint)


def run_jobs(sweep, dp: DataParallel, device: str, dtype: str, results: str, fsdp: bool = False,
             checkpoint: bool = False, progress: bool = True, out=None) -> int:
    """Run the Edge Pruning jobs of ``sweep`` data-parallel on every rank; rank 0 records them.
    Returns the number of failed jobs (the same on every rank)."""
    import torch.distributed as dist

    from . import runner
    from .workbench import preload
    from .method import get_method
    from .store import ResultsStore, check_writable

    out = out or sys.stdout
    jobs, refs = sweep.plan(device=device.split(":")[0], dtype=dtype)
    for job in jobs:
        if not getattr(get_method(job.method), "supports_data_parallel", False):
            raise UserError(f"method {job.method!r} cannot train data-parallel; only Edge Pruning (ep) can")
    units = None
    if dp.rank == 0:  # the one runner's plan, against the store; every rank runs the same units
        check_writable(results)
        store = ResultsStore(results)
        try:
            plan = runner.make_plan(jobs, refs, store, device, dtype, progress=False, threads=None)
        finally:
            store.close()
        units = plan.units
        todo = sum(u.kind == "job" for u in units)
        print(f"{len(jobs)} jobs planned, {len(jobs) - todo} already complete in {results}; running "
              f"{len(units)} units over {dp.world_size} processes", file=out, flush=True)
        for line in sweep.override_lines(jobs):  # as `circuitbench run` prints them
            print(f"override: {line}", file=out, flush=True)
    box = [units]
    dist.broadcast_object_list(box, src=0)
    failed = 0
    loaded: dict = {}
    for unit in box[0]:
        model = unit.job.model if unit.job is not None else unit.reference.model
        if model not in loaded:
            loaded.clear()  # one model in memory at a time
            loaded[model] = load_for_rank(model, device, dtype, fsdp, checkpoint)
            preload(model, device, dtype, *loaded[model])
        # the method instance of a job trains as this rank of the group (no class attribute changes)
        result = runner.execute(replace(unit, progress=progress and dp.rank == 0,
                                        data_parallel=dp if unit.kind == "job" else None))
        if result.kind == "failed":
            failed += 1
        elif unit.kind == "job":
            result.info["data_parallel"] = {"world_size": dp.world_size, "fsdp": fsdp, "checkpoint": checkpoint}
        if dp.rank == 0:
            store = ResultsStore(results)
            try:
                store.record(result)
            finally:
                store.close()
            if result.kind == "failed":
                print(f"{unit.label} failed: {result.error}", file=sys.stderr)
            else:
                print(f"recorded {unit.label}", file=out, flush=True)
    return failed


def _parser():
    p = argparse.ArgumentParser(prog="torchrun ... -m circuitbench.distributed",
                                description="Edge Pruning data-parallel over torchrun processes (see the module "
                                            "docstring for the launch commands).")
    p.add_argument("--casestudy", choices=["boolexpr"], help="train the case study's IP and FS circuits")
    p.add_argument("--preset", choices=["smoke", "quick", "paper"], help="case-study preset (with --casestudy)")
    p.add_argument("--task", "--tasks", dest="tasks", help="task name or comma list")
    p.add_argument("--model", required=True, help="model spec")
    p.add_argument("--sparsities", help="comma list of target sparsities")
    p.add_argument("--n-train", dest="n_train", type=int, help="training-set size")
    p.add_argument("--seeds", help="method seeds, comma list")
    p.add_argument("--method-preset", dest="method_preset", help="Edge Pruning preset (smoke/quick/paper)")
    p.add_argument("--set", dest="set_values", action="append", metavar="ep.FIELD=VALUE",
                   help="override an Edge Pruning hyperparameter (repeatable)")
    p.add_argument("--steps", type=int, help="Edge Pruning steps (with --casestudy)")
    p.add_argument("--eval-limit", dest="eval_limit", type=int, help="evaluate on the first N test examples")
    p.add_argument("--results", default="results", help="results folder (default results/)")
    p.add_argument("--dtype", help="float32, bfloat16 (default on GPUs) or float16")
    p.add_argument("--fsdp", action="store_true", help="shard the frozen model over the processes with FSDP (GPUs or CPU)")
    p.add_argument("--checkpoint", action="store_true", default=None,
                   help="gradient checkpointing of the masked pass (default: on with CUDA for --casestudy)")
    p.add_argument("--backend", choices=["nccl", "gloo"], help="default: nccl with CUDA, else gloo")
    p.add_argument("--batch", type=int, default=1, help="(--dry-run) examples per device per step")
    p.add_argument("--seq", type=int, default=128, help="(--dry-run) tokens per example")
    p.add_argument("--nproc", type=int, default=1, help="(--dry-run) devices the model is sharded over")
    p.add_argument("--dry-run", action="store_true", help="print the memory estimate per device; load nothing")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def _sweep_from_args(args, device: str):
    from .sweep import Sweep, parse_set

    if args.casestudy:
        from .casestudy import case_study_sweep, default_hardware

        # the hardware defaults of `circuitbench casestudy`, so its job ids match and it resumes these jobs
        _, dtype, checkpoint = default_hardware(device, args.dtype, args.checkpoint)
        return case_study_sweep(args.model, preset=args.preset or "quick", steps=args.steps, n_train=args.n_train,
                                limit=args.eval_limit, results=args.results, dtype=dtype, checkpoint=checkpoint)
    if not args.tasks:
        raise UserError("give --task NAME (or --casestudy boolexpr)")
    flags = {"methods": "ep", "tasks": args.tasks, "models": args.model, "sparsities": args.sparsities,
             "n_train": None if args.n_train is None else str(args.n_train), "seeds": args.seeds,
             "method_preset": args.method_preset, "eval_limit": args.eval_limit, "results": args.results}
    if args.set_values:
        flags["method_config"] = parse_set(args.set_values)
    return Sweep.build(flags=flags)


def main(argv=None) -> int:
    from .costs import format_estimate
    from .models import ModelSpec

    args = _parser().parse_args(argv)
    failed = 0
    try:
        if args.dry_run:
            _sweep_from_args(args, "cpu")  # validates the arguments
            config = ModelSpec.parse(args.model).config()
            if config is None:
                raise UserError(f"no config for {args.model!r} without loading it (not cached offline)")
            dtype = args.dtype or "bfloat16"
            print(format_estimate(args.model, config, args.nproc, args.batch, args.seq, dtype, bool(args.checkpoint)))
            return 0
        dp, device = init_from_env(args.backend)
        sweep = _sweep_from_args(args, device)
        dtype = args.dtype or sweep.get("dtype") or ("bfloat16" if device.startswith("cuda") else "float32")
        if device == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // dp.world_size))
        failed = run_jobs(sweep, dp, device, dtype, sweep.get("results") or args.results, fsdp=args.fsdp,
                          checkpoint=bool(args.checkpoint), progress=args.progress)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
