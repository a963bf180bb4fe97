"""Several processes: `torchrun --nproc_per_node N -m hardener eval ...` shards an evaluation.

The samples are cut into the fixed blocks the attack chains already use (block k = samples [kB, (k+1)B) for
--batch-size B); block k goes to rank k mod N. Each process runs every threat model on its blocks (samples are
independent, and an attack's answer on a sample depends only on its block), rank 0 gathers the per-sample masks,
attack rows and provenance, puts them back in the sample order, and alone runs the sanity checks and the eps sweep
and writes the report. On CPU the result is bit-identical to one process with the same seed and batch size; on GPU
equal per sample up to the kernels' nondeterminism (unless --deterministic).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from ..errors import InputError, RunError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place, from the variables torchrun sets (one process when they are absent)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise InputError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (they are set by torchrun)") from None
    if size < 1 or not 0 <= rank < size:
        raise InputError(f"RANK {rank} is outside WORLD_SIZE {size}")
    return World(rank, size, local)


def init(w: World, device: torch.device) -> torch.device:
    """Join the process group (nccl on CUDA, gloo otherwise); on CUDA each process takes GPU LOCAL_RANK."""
    import torch.distributed as dist

    if not w.active or dist.is_initialized():
        return device
    if device.type == "cuda":
        if w.local_rank >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {w.local_rank} but only {torch.cuda.device_count()} GPUs: start at most "
                             "that many processes per node")
        device = torch.device("cuda", w.local_rank)
        torch.cuda.set_device(device)
    store = _rendezvous(w)
    try:
        # shards finish at different times (more robust samples, more attack work): rank 0 waits at the gather for
        # the slowest, far longer than the default 10 (nccl) or 30 (gloo) minutes
        store.set_timeout(COLLECTIVE_TIMEOUT)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=w.rank,
                                world_size=w.size, timeout=COLLECTIVE_TIMEOUT)
    except (RuntimeError, ValueError) as e:
        raise RunError(f"cannot join the process group of {w.size} processes: {str(e).splitlines()[0]}") from None
    return device


COLLECTIVE_TIMEOUT = timedelta(hours=24)
RENDEZVOUS_ENV = "HARDEN_RENDEZVOUS_SECONDS"  # how long the processes wait for each other at the start (default 120)


def _rendezvous(w: World):
    """The processes meet, as torchrun's env:// does, but give up after minutes, not the collectives' 24 hours:
    WORLD_SIZE > 1 set without a launcher (no MASTER_ADDR/MASTER_PORT) is an input error at once, and processes
    that never all arrive (a stale RANK/WORLD_SIZE in the environment, a peer that died) a one-line failure."""
    from torch.distributed import rendezvous

    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise InputError(f"WORLD_SIZE={w.size} and RANK={w.rank} ask for a run of {w.size} processes, but "
                         f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: start it with "
                         "torchrun (torchrun --nproc_per_node N -m hardener ...), or unset WORLD_SIZE, RANK and "
                         "LOCAL_RANK for one process")
    try:
        seconds = float(os.environ.get(RENDEZVOUS_ENV) or 120)
        port = int(os.environ["MASTER_PORT"])
    except ValueError:
        raise InputError(f"MASTER_PORT must be an integer and {RENDEZVOUS_ENV} a number of seconds") from None
    if not (seconds > 0 and math.isfinite(seconds)) or not 0 < port < 65536:
        raise InputError(f"MASTER_PORT must be 1..65535 and {RENDEZVOUS_ENV} a positive number of seconds")
    where = f"{os.environ['MASTER_ADDR']}:{port}"
    fail = (f"the {w.size} processes of WORLD_SIZE={w.size} did not all meet at {where} within {seconds:g} s{{}}; "
            "start them together with torchrun, or unset WORLD_SIZE, RANK and LOCAL_RANK for one process")
    # a client waits for the store here first: torch's own client logs C++ traces on stderr when it gives up
    if not w.main and not _reachable(os.environ["MASTER_ADDR"], port, seconds):
        raise RunError(fail.format(f" (nothing listens at {where})"))
    try:
        store, _, _ = next(rendezvous("env://", rank=w.rank, world_size=w.size, timeout=timedelta(seconds=seconds)))
    except (RuntimeError, ValueError, OSError) as e:
        raise RunError(fail.format(f" ({str(e).splitlines()[0][:200]})")) from None
    return store


def _reachable(host: str, port: int, seconds: float) -> bool:
    """Whether something accepts connections at host:port within `seconds` (rank 0's store, or torchrun's)."""
    import socket
    import time

    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)


def shard(n: int, block: int, w: World) -> torch.Tensor:
    """The sample positions of this rank: its whole blocks, in order."""
    blocks = range(w.rank, -(-n // block), w.size)
    if not blocks:
        return torch.empty(0, dtype=torch.long)
    return torch.cat([torch.arange(k * block, min(n, (k + 1) * block)) for k in blocks])


def state_suffix(w: World) -> str:
    """What a process adds to the name of its resumable state file in a sharded run ("-rank<r>of<N>")."""
    return f"-rank{w.rank}of{w.size}" if w.active else ""


def clear_other_states(path, w: World) -> None:
    """Rank 0, once the report is written: the other ranks' state files beside its own `path` (None: none kept)."""
    if w.active and path is not None:
        for r in range(1, w.size):
            path.with_name(path.name.replace(state_suffix(w), f"-rank{r}of{w.size}")).unlink(missing_ok=True)


def gather(obj, w: World) -> list | None:
    """Every rank's `obj` on rank 0 (None elsewhere)."""
    import torch.distributed as dist

    out = [None] * w.size if w.main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(w: World) -> None:
    if w.active:
        import torch.distributed as dist

        dist.barrier()


def finish(w: World) -> None:
    if w.active:
        import torch.distributed as dist

        if dist.is_initialized():
            # together: a process that tears its group down while another still talks to it can abort (gloo,
            # seen under load); if rank 0 fails before this, torchrun stops the others
            dist.barrier()
            dist.destroy_process_group()
        if not w.main:
            # nothing is left for this rank to do, and a background thread of the torch.distributed runtime can abort
            # the interpreter's exit ("terminate called without an active exception"; about 1 run in 6 of the
            # 2-process test on 2 CPU cores): leave at once, output flushed (rank 0 alone writes files)
            import sys

            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
