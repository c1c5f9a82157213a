"""Where the trainer and the rollout sidecars run, and how they share a GPU's memory.

JAX's GPU allocator takes a fixed fraction of each GPU when it starts and never hands memory
back; vLLM refuses to start unless its `gpu_memory_utilization` is free. So a trainer and
sidecars on the same GPUs need a fixed split, set before either starts:

- the trainer: `XLA_PYTHON_CLIENT_MEM_FRACTION` = `trainer.xla_memory_fraction` (0: what
  the placement leaves it, `config.trainer_memory_fraction`);
- each sidecar: vLLM's `--gpu-memory-utilization` (a JAX sidecar gets it as its
  `XLA_PYTHON_CLIENT_MEM_FRACTION`) = `generator.gpu_memory_utilization`;

and `config.validate` refuses colocated splits that sum over 1.

GPU indices are positions in the launcher's own CUDA_VISIBLE_DEVICES when that is set, so a
launcher confined to GPUs 4-7 places everything there.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dapo_jax.procs import PARENT_PID_ENV
from dapo_jax.train.config import ALONE_MEMORY_FRACTION
from dapo_jax.train.settings import Settings

MEM_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
TOKEN_ENV = "ROLLOUT_TOKEN"


@dataclasses.dataclass(frozen=True)
class SidecarSpec:
    index: int
    gpus: tuple[int, ...]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def trainer_gpus(s: Settings) -> tuple[int, ...]:
    return tuple(range(s.placement.policy_num_gpus_per_node))


def engine_gpus(s: Settings) -> list[tuple[int, ...]]:
    """GPUs of each inference engine: colocated engines tile the trainer's GPUs; otherwise
    they take the GPUs after the trainer's."""
    g, p = s.rollout, s.placement
    tp = g.inference_engine_tensor_parallel_size
    first = 0 if p.colocate_all else p.policy_num_gpus_per_node
    return [tuple(range(first + i * tp, first + (i + 1) * tp))
            for i in range(g.num_inference_engines)]


def visible_devices(gpus: tuple[int, ...], base_env: Mapping[str, str]) -> str:
    """CUDA_VISIBLE_DEVICES for `gpus`, positions in the parent's own list if it has one."""
    parent = base_env.get("CUDA_VISIBLE_DEVICES")
    if parent:
        physical = [d.strip() for d in parent.split(",") if d.strip()]
        if max(gpus) >= len(physical):
            raise ValueError(f"GPUs {list(gpus)} are not all among CUDA_VISIBLE_DEVICES="
                             f"{parent} ({len(physical)} devices)")
        return ",".join(physical[i] for i in gpus)
    return ",".join(str(i) for i in gpus)


def trainer_env(s: Settings, base_env: Mapping[str, str], process: int = 0,
                num_processes: int = 1) -> dict[str, str]:
    """The environment of trainer process `process` of `num_processes` on this machine: its
    equal share of the trainer's GPUs. (On CPU each process's device count comes from the
    inherited XLA_FLAGS / JAX_NUM_CPU_DEVICES.)"""
    gpus = trainer_gpus(s)
    if len(gpus) % num_processes:
        raise ValueError(f"trainer.placement.policy_num_gpus_per_node={len(gpus)} GPUs do not "
                         f"split over {num_processes} trainer processes")
    per = len(gpus) // num_processes
    return {**base_env, MEM_FRACTION_ENV: str(s.trainer_memory_fraction()),
            "CUDA_VISIBLE_DEVICES": visible_devices(gpus[process * per:(process + 1) * per],
                                                    base_env),
            PARENT_PID_ENV: str(os.getpid())}


def sidecar_env(s: Settings, spec: SidecarSpec, base_env: Mapping[str, str],
                token: str) -> dict[str, str]:
    return {**base_env, MEM_FRACTION_ENV: str(s.rollout.gpu_memory_utilization),
            "CUDA_VISIBLE_DEVICES": visible_devices(spec.gpus, base_env),
            TOKEN_ENV: token, PARENT_PID_ENV: str(os.getpid())}


def sidecar_command(s: Settings, spec: SidecarSpec, export_root: Path) -> list[str]:
    """A sidecar's command line. Its longest sequence is `max_model_len` (vLLM sizes its KV
    cache and concurrency from it, not from the model's 32k positions)."""
    g = s.rollout
    cmd = [g.sidecar_python or sys.executable, "-m", "rollout.server",
           "--engine", g.sidecar_engine, "--model", s.model.path,
           "--port", str(spec.port), "--export-root", str(export_root),
           "--dtype", g.model_dtype, "--max-model-len", str(g.max_model_len),
           "--gpu-memory-utilization", str(g.gpu_memory_utilization)]
    if g.sidecar_engine == "vllm":
        cmd += ["--tensor-parallel-size", str(g.inference_engine_tensor_parallel_size)]
    return cmd


def apply_trainer_memory_fraction(s: Settings) -> None:
    """Sets the trainer's XLA_PYTHON_CLIENT_MEM_FRACTION from the settings; call it before
    anything starts a JAX backend (JAX reads it once, when the GPU client is created)."""
    os.environ[MEM_FRACTION_ENV] = str(s.trainer_memory_fraction())


def with_xla_flags(flags: str, extra: tuple[str, ...]) -> str:
    """XLA_FLAGS `flags` with each of `extra` appended unless `flags` already sets it."""
    have = {f.split("=", 1)[0] for f in flags.split()}
    return " ".join([*flags.split(), *(f for f in extra if f.split("=", 1)[0] not in have)])


def apply_trainer_xla_flags(s: Settings) -> None:
    """Adds `trainer.xla_gpu_flags` to XLA_FLAGS (a flag the environment already sets wins);
    call it before anything starts a JAX backend (XLA reads XLA_FLAGS once). The CPU and TPU
    compilers ignore GPU options."""
    flags = with_xla_flags(os.environ.get("XLA_FLAGS", ""), s.placement.xla_gpu_flags)
    if flags:
        os.environ["XLA_FLAGS"] = flags


def memory_budget(devices: list[Any]) -> float:
    """Bytes per device the trainer's allocator may hold: the least `bytes_limit` of
    `devices` (a GPU's XLA_PYTHON_CLIENT_MEM_FRACTION of its memory, a TPU's HBM); on CPU,
    which reports none, this machine's memory x ALONE_MEMORY_FRACTION over its devices."""
    stats = [d.memory_stats() for d in devices]
    if all(s and s.get("bytes_limit") for s in stats):
        return float(min(s["bytes_limit"] for s in stats))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    import jax  # here: this module runs before JAX starts (the launcher never imports it)

    return ram * ALONE_MEMORY_FRACTION / jax.local_device_count()
