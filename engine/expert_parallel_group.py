"""Joining the ranks of an expert-parallel engine (on one machine, or torchrun's across machines), and the start-up checks they run together.

Every rank calls `join_ranks` with the same store and world size: it initializes torch.distributed (NCCL on
CUDA, gloo on CPU) for the MoE layers' all-reduce, and returns a separate gloo group for what travels as Python
objects (the lead rank's commands, fingerprints, byte counts), since NCCL cannot carry those. The checks compare
every rank against rank 0, so that all ranks raise the same error together instead of one waiting alone in the
first collective for ranks that are gone.
"""

from __future__ import annotations

import hashlib
import struct
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from engine.checkpoint import weight_files
from engine.config import CheckpointError

# How long a collective waits for the other ranks. Generous: ranks compile and warm up on their own at start;
# a rank that dies is noticed at once by its process's sentinel (on one machine) or by gloo seeing its
# connections close (a torchrun rank on another machine), not by this timeout.
COLLECTIVE_TIMEOUT = timedelta(seconds=300)


ENV_INIT = "env://"  # join as a launcher (torchrun) says: MASTER_ADDR, MASTER_PORT (and its agent's store)


def rank_device(device: str, local_rank: int) -> str:
    """The device a rank runs on: CUDA ranks take one GPU each (cuda:local_rank, the rank's index on its own
    machine), CPU ranks share the CPU."""
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    return f"cuda:{local_rank}" if wants_cuda else "cpu"


def join_ranks(rank: int, world: int, init_method: str, device: str) -> None:
    """Initialize the default process group: from a file store shared by the ranks of one machine
    (file://PATH), or from a launcher's environment across machines (ENV_INIT)."""
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend, init_method, COLLECTIVE_TIMEOUT, world, rank)


def object_group() -> dist.ProcessGroup:
    """A gloo group over all ranks of the default group, for Python objects (every rank calls it, in the same
    order as its other new groups)."""
    group = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
    assert group is not None
    return group


def checkpoint_fingerprint(path: Path) -> str:
    """sha256 of config.json and every safetensors file's header (names, dtypes, shapes, offsets): cheap to
    compute (no weights read) and different for any two checkpoints that are not copies of each other's layout."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for file in weight_files(path):
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            digest.update(file.name.encode() + b"\0" + handle.read(length))
    return digest.hexdigest()


def check_same_checkpoint(path: Path, group: dist.ProcessGroup) -> None:
    """CheckpointError on every rank, naming rank 0's checkpoint and the first rank whose differs, unless all
    ranks load the same one."""
    mine = (str(path), checkpoint_fingerprint(path))
    found: list[tuple[str, str] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(found, mine, group=group)
    lead = found[0]
    assert lead is not None
    for rank, theirs in enumerate(found):
        assert theirs is not None
        if theirs[1] != lead[1]:
            raise CheckpointError(
                f"the expert-parallel ranks disagree on the checkpoint: rank 0 loads {lead[0]} (sha256 {lead[1][:16]}), "
                f"rank {rank} loads {theirs[0]} (sha256 {theirs[1][:16]})"
            )


def gather_from_ranks(value: int, group: dist.ProcessGroup) -> tuple[int, ...]:
    """Every rank's `value`, by rank, on every rank."""
    found: list[int | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(found, value, group=group)
    return tuple(int(item) for item in found if item is not None)
