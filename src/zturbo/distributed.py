"""Processes that share one image (`--parallel N`): start them, join them into one process group,
and hand back what the first of them returns.

Each process owns one GPU (process i takes CUDA device i of those visible; CUDA_VISIBLE_DEVICES
chooses them) and talks to the others over NCCL; on the CPU the same code runs over gloo, which is
how the tests check that N processes make the one-process image. Every process loads the whole
model and runs the same calls (`Engine.load(..., shards=...)` documents the split); the first
writes the files.
"""

from __future__ import annotations

import pickle
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .accel.sequence import Shards
from .errors import DeviceError, InvalidRequestError

RankMain = Callable[..., Any]  # fn(shards, *args), run in every process; the first one's result is returned
POLL_S = 0.2  # how often the launcher looks for the first process's result while waiting for all


def device_type(device: str, parallel: int) -> str:
    """'cuda' or 'cpu': where `parallel` processes run for a `--device` setting; refused before any
    process starts where that cannot work."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cuda", "cpu"):
        raise InvalidRequestError(
            f"--parallel {parallel} with --device {device} is not supported: use cuda (process i takes GPU i; "
            "choose the GPUs with CUDA_VISIBLE_DEVICES) or cpu"
        )
    if device == "cuda" and torch.cuda.device_count() < parallel:
        raise DeviceError(f"--parallel {parallel} needs {parallel} GPUs; {torch.cuda.device_count()} are visible")
    return device


def join(rank: int, size: int, address: str, kind: str) -> Shards:
    """This process's place in a group of `size` that meet at `address` (tcp://host:port)."""
    if kind == "cuda":
        torch.cuda.set_device(rank)
    backend = "nccl" if kind == "cuda" else "gloo"
    options = {"device_id": torch.device("cuda", rank)} if kind == "cuda" else {}
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=size, **options)
    return Shards(dist.group.WORLD, rank, size)


def launch(parallel: int, device: str, fn: RankMain, *args: Any) -> Any:
    """Run `fn(shards, *args)` in `parallel` new processes joined in one group; the first process's
    result. An exception in any process is raised here (torch.multiprocessing's ProcessRaisedException)."""
    kind = device_type(device, parallel)
    results = mp.get_context("spawn").SimpleQueue()
    address = f"tcp://127.0.0.1:{_free_port()}"
    context = mp.start_processes(
        _rank_main, (parallel, address, kind, results, fn, args), nprocs=parallel, join=False, start_method="spawn"
    )
    found: list[Any] = []
    # Read while waiting: a result larger than the pipe's buffer would otherwise block its sender.
    while not context.join(timeout=POLL_S):
        found += _drain(results)
    found += _drain(results)
    if not found:
        raise RuntimeError("the first process of the group ended without a result")
    return pickle.loads(found[0])


def _rank_main(rank: int, size: int, address: str, kind: str, results: Any, fn: RankMain, args: tuple) -> None:
    shards = join(rank, size, address, kind)
    try:
        out = fn(shards, *args)
        if rank == 0:
            # As bytes: torch's queue would pass tensors as shared memory, gone when this process ends.
            results.put(pickle.dumps(out))
    finally:
        dist.destroy_process_group()


def _drain(results: Any) -> list[Any]:
    out = []
    while not results.empty():
        out.append(results.get())
    return out


def _free_port() -> int:
    """A TCP port free now on this host, for the group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
