"""Data parallel training with torch.distributed, without DDP.

Why not ``DistributedDataParallel``: ALaST trains a different set of blocks every step. DDP either
fails on that (its default) or needs ``find_unused_parameters=True`` and then still all-reduces every
bucket, frozen blocks included (pytorch issue 90171). Here the runtime hands us exactly the
parameters trained this step and we all-reduce their gradients as one flattened bucket, so frozen
blocks cost no communication. Weights stay identical because (1) rank 0's initial weights are
broadcast, (2) every rank applies the same averaged gradients with the same optimizer, and
(3) budgets and the trained-block set are identical on every rank: per-sample deltas are gathered
over the global batch and block sampling is seeded by (seed, step), never by rank.

Entry points: ``torchrun --nproc-per-node N -m alast_cli train ...`` (workers call
:func:`init_from_env`) and ``alast train --nproc N`` (``alast_cli.launch`` runs
``torch.distributed.run`` with the same arguments).
"""
from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

_TIMEOUT = timedelta(minutes=30)


class TorchComm:
    """The communicator the torch runtime and the loop use (one per process).

    ``bytes_history`` holds, per training step, the bytes of gradient all-reduced by this rank.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank, self.world_size, self.device = rank, world_size, device
        self.bytes_history: list[int] = []

    # -- the runtime's interface -------------------------------------------------------------
    @torch.no_grad()
    def broadcast_parameters(self, params: Sequence[torch.Tensor]) -> None:
        """Copy rank 0's values into ``params`` on every rank (one bucket per dtype)."""
        for group in _by_dtype([p.data for p in params]):
            flat = _flatten_dense_tensors(group).to(self.device)
            dist.broadcast(flat, src=0)
            for t, synced in zip(group, _unflatten_dense_tensors(flat, group)):
                t.copy_(synced)

    def gather_batch(self, deltas: torch.Tensor) -> torch.Tensor:
        """``[L, B_local]`` per-sample values -> ``[L, B_local * world]`` in rank order."""
        local = deltas.contiguous().to(self.device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts, dim=1)

    def mean_scalar(self, value: float) -> float:
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    @torch.no_grad()
    def all_reduce_gradients(self, params: Sequence[torch.Tensor]) -> None:
        """Average the gradients of ``params`` (the parameters trained this step) over the ranks.

        All ranks must pass the same parameters in the same order; the runtime guarantees it
        because the trained set comes from identical budgets.
        """
        grads = [p.grad for p in params if p.grad is not None]
        sent = 0
        for group in _by_dtype(grads):
            flat = _flatten_dense_tensors(group)
            dist.all_reduce(flat)
            flat.div_(self.world_size)
            for g, synced in zip(group, _unflatten_dense_tensors(flat, group)):
                g.copy_(synced)
            sent += flat.numel() * flat.element_size()
        self.bytes_history.append(sent)

    # -- what the loop needs beyond it ---------------------------------------------------------
    @property
    def last_bytes(self) -> int | None:
        return self.bytes_history[-1] if self.bytes_history else None

    def any_true(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (e.g. a stop request)."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (picklable) on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_equal(self, text: str) -> bool:
        """Whether every rank passed the same string (used to compare weight digests)."""
        out = self.all_gather_object(text)
        return all(o == out[0] for o in out)

    def close(self, barrier: bool = True) -> None:
        """Leave the process group. With ``barrier`` (the normal end of a run) every rank leaves together:
        a rank that tears gloo down while a peer still talks to it can abort at exit."""
        if dist.is_initialized():
            if barrier:
                dist.barrier()
            dist.destroy_process_group()


def _by_dtype(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return list(groups.values())


def weights_digest(params: Sequence[torch.Tensor]) -> str:
    """SHA-256 of the parameters' bytes: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


# -- worker side: under torchrun -------------------------------------------------------------
def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_from_env(device: str = "auto", init_method: str = "env://") -> TorchComm | None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    Returns None outside torchrun or with one process. gloo on CPU, nccl on CUDA (one GPU per local
    rank, chosen by LOCAL_RANK).
    """
    world = env_world_size()
    if world <= 1:
        return None
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if torch.cuda.device_count() < local_world:
            raise ValueError(f"{local_world} ranks on this machine but {torch.cuda.device_count()} CUDA "
                             "device(s); lower --nproc or pass --set backend.device=cpu")
        torch.cuda.set_device(local_rank)
        dev, backend = torch.device("cuda", local_rank), "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=_TIMEOUT)
    return TorchComm(rank, world, dev)


# -- local spawning: tests and benchmarks ------------------------------------------------------
def _spawn_entry(local_rank: int, world: int, store: str, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(RANK=str(local_rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    comm = init_from_env("cpu", init_method=f"file://{store}")
    finished = False
    try:
        result = fn(comm, *args)
        torch.save(result, os.path.join(out_dir, f"rank{local_rank}.pt"))
        finished = True
    finally:
        comm.close(barrier=finished)


def read_rank_results(out_dir: str, world_size: int) -> list[Any]:
    """Each rank's result from ``out_dir/rank{r}.pt``, read with torch's allow-list unpickler.

    ``weights_only=True`` rebuilds only tensors and plain containers (dict, list, tuple, numbers,
    strings) and refuses any other global, so a planted file cannot run code; a result holding
    anything else is refused the same way (return tensors and plain data from ``fn``).
    """
    import pickle

    results = []
    for r in range(world_size):
        path = os.path.join(out_dir, f"rank{r}.pt")
        try:
            results.append(torch.load(path, map_location="cpu", weights_only=True))
        except pickle.UnpicklingError as exc:
            lines = [l for l in str(exc).splitlines() if "GLOBAL" in l or "Unsupported" in l]
            first = (lines or str(exc).strip().splitlines() or ["unpickling refused"])[0].strip()[:200]
            raise RuntimeError(f"rank {r}'s result {path} holds more than tensors and plain data, refused "
                               f"without running it ({first})") from None
    return results


def run_local(world_size: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """Run ``fn(comm, *args)`` on ``world_size`` CPU processes (gloo); returns each rank's result.

    ``fn`` must be importable by name (a module-level function) and return tensors and plain
    data (dicts, lists, tuples, numbers, strings): see :func:`read_rank_results`.
    """
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="alast-dist-") as tmp:
        store = os.path.join(tmp, "store")
        mp.start_processes(_spawn_entry, args=(world_size, store, fn, args, tmp), nprocs=world_size,
                           join=True, start_method="spawn")
        return read_rank_results(tmp, world_size)
