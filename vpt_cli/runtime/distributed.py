"""Data-parallel runs under torchrun: the process group, DDP, and the few collectives that make
N processes compute what one process computes with the same global batch.

Every function here is the identity (or a no-op) in a single process, so the loops call them
unconditionally. Which samples each process loads is `vpt_cli.runtime.sharding`'s concern.
"""
from __future__ import annotations

import atexit
import os
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from vpt_cli.core.errors import UsageError
from vpt_cli.runtime.device import pick_device
from vpt_cli.runtime.reporting import Reporter
from vpt_cli.runtime.sharding import shard_bounds

T = TypeVar("T")


def join_from_env(device: str) -> None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT), once per process: NCCL when the run is on CUDA (one GPU per local rank),
    gloo otherwise. Left again when the process exits."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2 or dist.is_initialized():
        return
    cuda = pick_device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    atexit.register(leave)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 writes every file and reports progress; the others only compute. Before the group
    is joined, torchrun's RANK says."""
    return rank() == 0 if dist.is_initialized() else os.environ.get("RANK", "0") == "0"


def refuse_under_torchrun(command: str, why: str) -> None:
    """Commands that do not shard their work end at once, in every process, under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError(f"{command} runs in one process ({why}); start it without torchrun or --devices")


def shard() -> tuple[int, int]:
    """(rank, world size): which slice of every global batch this process loads."""
    return rank(), world_size()


def own_block(count: int) -> slice:
    """This process's contiguous block of `count` items (predict's files)."""
    return slice(*shard_bounds(count, rank(), world_size()))


def main_reporter(reporter: Reporter) -> Reporter:
    """`reporter` on rank 0, a silent one elsewhere: one progress bar and one log per job."""
    return reporter if is_main() else Reporter()


def share_note(batch_size: int) -> str | None:
    """What each process loads of a global batch, for the run log; None in a single process."""
    if world_size() == 1:
        return None
    shares = sorted({end - start for start, end in (shard_bounds(batch_size, r, world_size())
                                                     for r in range(world_size()))}, reverse=True)
    per_rank = " or ".join(map(str, shares))
    return f"{world_size()} processes: global batch {batch_size}, {per_rank} images per process and step"


def _collective_device() -> torch.device:
    """Where tensors must be for the backend's collectives: the local GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_across(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all processes (returned on `tensor`'s device)."""
    if world_size() == 1:
        return tensor
    total = tensor.to(_collective_device(), copy=True)
    dist.all_reduce(total)
    return total.to(tensor.device)


def sum_values(*values: float) -> list[float]:
    """Python numbers summed over all processes (float64: exact for counts)."""
    if world_size() == 1:
        return list(values)
    return sum_across(torch.tensor(values, dtype=torch.float64)).tolist()


def step_divisor(local_count: int) -> float:
    """What this process divides its summed loss by. DDP averages gradients over the N processes,
    so dividing by (global batch / N) makes the step the single-process step on the global batch's
    mean loss, even when the shares differ (one image more here, a skipped image there). A step
    with no image anywhere adds zero gradients rather than NaN."""
    if world_size() == 1:
        return float(local_count)
    return max(sum_values(local_count)[0], 1.0) / world_size()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel over the trainable parameters: prompts and head, everything in a
    full fine-tune (DDP leaves parameters without requires_grad alone)."""
    if world_size() == 1:
        return model
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def share_trained(tensors: dict[str, torch.Tensor]) -> None:
    """Overwrite every process's copy of `tensors` (in place) with rank 0's: the start the token
    init and the probe computed is then bit-identical everywhere, whatever the kernels did."""
    if world_size() == 1:
        return
    for tensor in tensors.values():
        staged = tensor.to(_collective_device())
        dist.broadcast(staged, src=0)
        if staged is not tensor:
            tensor.copy_(staged)


def gather_rows(indices: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Rows of `tensors` from every process, ordered by their dataset `indices`: what a single
    process gets from a sequential loader. Shares may differ in size (padded for the collective)."""
    if world_size() == 1:
        return list(tensors)
    device = _collective_device()
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(counts, torch.tensor([len(indices)], device=device))
    most = max(int(c) for c in counts)
    gathered = []
    for tensor in (indices, *tensors):
        padded = torch.zeros((most, *tensor.shape[1:]), dtype=tensor.dtype, device=device)
        padded[:len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in range(world_size())]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([part[:int(count)] for part, count in zip(parts, counts)]).to(tensor.device))
    order = gathered[0].argsort()
    return [tensor[order] for tensor in gathered[1:]]


def gather_lists(items: list[T]) -> list[T]:
    """Every process's `items` concatenated in rank order (picklable objects)."""
    if world_size() == 1:
        return items
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def gather_rng(state: dict[str, Any]) -> dict[str, Any]:
    """Every process's random-number generators in one dict for the checkpoint: rank 0's under
    their own keys, rank r's under `rank{r}.`, so each process resumes its own draws (its
    augmentation and prompt dropout)."""
    if world_size() == 1:
        return state
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, state)
    merged = dict(parts[0])
    for r, part in enumerate(parts[1:], 1):
        merged.update({f"rank{r}.{key}": value for key, value in part.items()})
    return merged


def own_rng(state: dict[str, Any]) -> dict[str, Any]:
    """This process's generators from `gather_rng`'s dict (rank 0's when it has none: a checkpoint
    written by fewer processes)."""
    prefix = f"rank{rank()}."
    mine = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    return mine if rank() and mine else {key: value for key, value in state.items() if not key.startswith("rank")}


def from_main(compute: Callable[[], T]) -> T:
    """Run `compute` on rank 0 only and hand its result, or the error it raised, to every process,
    so that a refusal (task exists, locked) ends all of them with rank 0's message."""
    if world_size() == 1:
        return compute()
    box: list[Any] = [None]
    if is_main():
        try:
            box[0] = (True, compute())
        except Exception as exc:
            box[0] = (False, exc)
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value
