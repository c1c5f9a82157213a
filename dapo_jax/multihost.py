"""Running as several JAX processes (one per host: TPU pods, multi-node GPU clusters, or
several processes on one machine), and the few host-side exchanges the trainer needs.

The trainer is a multi-controller SPMD program: every process runs the same host loop on the
same host data (prompt order, seeds and every dynamic-sampling decision are computed
identically everywhere), and jitted functions run over the global mesh, each process feeding
and computing the shards of its own devices. Host values that only some process has are
exchanged explicitly:

- device results the host needs (generated tokens, log-probs) are gathered (`to_host`);
- work done per process on the host (reward scoring) is split in contiguous shares and the
  results gathered in order (`split_work`), so every process ends up with the same values;
- a result only process 0 has (the sidecar client's samples) is shared (`from_primary`).

Files are written by process 0 (orbax writes each process's shards of a checkpoint).
"""

from __future__ import annotations

import dataclasses
import pickle
import sys
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """`jax.distributed.initialize` arguments. No coordinator: one process. "auto": JAX's
    own cluster detection (SLURM, Cloud TPU, GKE/Kubernetes, MPI) fills in everything."""

    coordinator_address: str | None  # None: one process
    num_processes: int | None
    process_id: int | None
    initialization_timeout_s: int  # defaults: the config's mesh.* keys
    heartbeat_timeout_s: int


def initialize(cfg: DistributedConfig) -> None:
    """Joins a multi-process job when configured (each process then sees only its own
    devices as local). On CPU, collectives between processes go through gloo (XLA:CPU has
    no cross-process collectives otherwise). A process that does not join within
    `initialization_timeout_s`, or that stops answering heartbeats for `heartbeat_timeout_s`
    during the run, ends the job with an error on every other process."""
    if cfg.coordinator_address is None:
        return
    if jax.distributed.is_initialized():
        return
    # Only the CPU backend reads this; accelerators keep their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = dict(initialization_timeout=cfg.initialization_timeout_s,
                                  heartbeat_timeout_seconds=cfg.heartbeat_timeout_s)
    if cfg.coordinator_address != "auto":
        kwargs.update(coordinator_address=cfg.coordinator_address,
                      num_processes=cfg.num_processes, process_id=cfg.process_id)
    where = ("cluster auto-detection" if cfg.coordinator_address == "auto" else
             f"coordinator {cfg.coordinator_address} as process {cfg.process_id} of "
             f"{cfg.num_processes}")
    joined = threading.Event()

    def explain() -> None:
        # JAX ends the process from C++ when the job does not assemble in time; say why first.
        if not joined.wait(cfg.initialization_timeout_s):
            print(f"dapo_jax: the multi-process job did not assemble within "
                  f"{cfg.initialization_timeout_s} s (mesh.initialization_timeout_s; {where}): "
                  "every process must start with the same mesh.coordinator_address and "
                  "num_processes and its own process_id, and process 0 must be reachable "
                  "there. JAX ends this process now.", file=sys.stderr, flush=True)

    threading.Thread(target=explain, daemon=True).start()
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # JAX raises several kinds here; all mean "could not join"
        raise RuntimeError(f"could not join the multi-process job ({where}, "
                           "mesh.coordinator_address / num_processes / process_id): "
                           f"{type(e).__name__}: {e}") from e
    finally:
        joined.set()


def is_primary() -> bool:
    return jax.process_index() == 0


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-process) array, on every process."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def share(n: int, process: int | None = None, count: int | None = None) -> slice:
    """This process's contiguous share of n items (the first n % count processes take one
    more)."""
    process = jax.process_index() if process is None else process
    count = jax.process_count() if count is None else count
    base, extra = divmod(n, count)
    start = process * base + min(process, extra)
    return slice(start, start + base + (process < extra))


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's `obj` (picklable), in process order, on every process."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int64))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    gathered = multihost_utils.process_allgather(padded)
    return [pickle.loads(gathered[i, :int(sizes[i, 0])].tobytes())
            for i in range(jax.process_count())]


def split_work[T](fn: Callable[[slice], list[T]], n: int) -> list[T]:
    """fn(share) on each process's share of n items, the parts concatenated in order on
    every process: the same list one process computing fn(slice(0, n)) would give."""
    parts = allgather_objects(fn(share(n)))
    out = [x for part in parts for x in part]
    if len(out) != n:
        raise RuntimeError(f"split_work: {len(out)} results for {n} items")
    return out


def from_primary[T](fn: Callable[[], T]) -> T:
    """fn() computed on process 0 only, its result on every process: its pickle broadcast
    from process 0 (its size first), so each process receives the payload once whatever
    the process count (an all-gather would move process_count copies of it)."""
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(fn()), np.uint8) if is_primary() else \
        np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.array(data.size, np.int64)))
    buffer = data if is_primary() else np.zeros(size, np.uint8)
    return pickle.loads(np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes())


def barrier(name: str) -> None:
    """Waits until every process reaches the same named point."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
