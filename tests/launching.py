"""Helpers for tests that run `python -m dapo_jax.launch` / `python -m dapo_jax.train` as
subprocesses: a seed-style tiny model, DAPO-schema data files, and process checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dapo_jax.procs import group_alive
from dapo_jax.prompts import DAPO_TEMPLATE, arithmetic_examples

REPO = Path(__file__).resolve().parent.parent
ASSET = REPO / "dapo_jax" / "assets" / "arith_base"


def seed_style_model(path: Path) -> Path:
    """The embedded tiny model with the special-token files laid out like the seed's base
    models: eos is <|endoftext|> alone in config.json, generation_config.json and
    tokenizer_config.json, while answers end their chat turn with <|im_end|>."""
    shutil.copytree(ASSET, path)
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((path / name).read_text())
        cfg["eos_token_id"] = 0  # <|endoftext|>
        (path / name).write_text(json.dumps(cfg, indent=2))
    tok = json.loads((path / "tokenizer_config.json").read_text())
    tok["eos_token"] = "<|endoftext|>"
    (path / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    return path


def dapo_parquet(path: Path, count: int, split: str, *, repeats: int = 1) -> Path:
    """Built-in arithmetic problems as DAPO-Math-17k / AIME rows (prompt messages,
    reward_model.ground_truth, data_source, ability, extra_info), each row `repeats` times as
    in the published files. The prompt is the task's question, as the tiny model knows it."""
    rows = []
    for i, ex in enumerate(arithmetic_examples(count, seed=0, split=split)):
        row = {"data_source": "math_dapo", "prompt": [{"role": "user",
                                                       "content": ex.messages[-1][1]}],
               "ability": "MATH", "reward_model": {"ground_truth": ex.ground_truth,
                                                   "style": "rule-lawful"},
               "extra_info": {"index": str(i)}}
        rows += [row] * repeats
    assert "{problem}" in DAPO_TEMPLATE  # the real data's content wraps the problem in it
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# The tests' CPU subprocesses (trainers, JAX sidecars, benchmarks) skip LLVM's expensive
# passes: an arith_tiny run's first step (its compiles) 14.2 -> 11.2 s on 8 devices and
# 11.4 -> 9.7 s on one, later steps as fast (measured side by side, 6 and 8 steps). Not
# for the H100/TPU compiles, which compile as the target would.
CPU_XLA_FLAGS = "--xla_llvm_disable_expensive_passes=true"


def env(devices: int | None = 8) -> dict[str, str]:
    """The environment of a CPU subprocess with `devices` simulated devices (None: as many
    as the program asks for, `jax_num_cpu_devices`)."""
    count = f" --xla_force_host_platform_device_count={devices}" if devices else ""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": CPU_XLA_FLAGS + count,
            "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def launch_cmd(config: str, overrides: dict[str, object]) -> list[str]:
    return [sys.executable, "-m", "dapo_jax.launch", "--config", config,
            *[f"--config.{k}={v}" for k, v in overrides.items()]]


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in open(path)]


def wait_for(predicate, timeout_s: float, proc: subprocess.Popen | None = None,
             what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} while waiting for "
                                 f"{what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.2)


def manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / "logs" / "launch.json"
    return json.loads(path.read_text()) if path.exists() else {}


def child_groups(run_dir: Path) -> list[int]:
    """Process groups (= pids of the group leaders) of the launcher's children."""
    m = manifest(run_dir)
    return [p for p in m.get("trainer_pids", []) + [s["pid"] for s in m.get("sidecars", [])]
            if p]


def group_size(pgid: int) -> int:
    """Live processes in the group (Linux)."""
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        count += fields[0] != "Z" and int(fields[2]) == pgid
    return count


def wait_groups_gone(groups: list[int], timeout_s: float) -> None:
    wait_for(lambda: not any(group_alive(g) for g in groups), timeout_s,
             what=f"process groups {groups} to end")
