"""Synchronous vs asynchronous DAPO on this machine: the main job (configs/arith_tiny.py)
with a JAX sidecar generating on one core (`taskset -c 1`) and the trainer on the other
(`taskset -c 0`), the trainer's reward-pool workers moved to the engine's core (scoring
belongs to the rollout side), both modes pinned the same way and placed the same way
(trainer.placement.colocate_all=false). Async is trainer.fully_async with
max_staleness_steps=1 and TIS on.

    python bench/async.py [--steps 14] [--staleness 1] [--set key=value ...]

Prints, per mode, the median of steps 3 .. steps-1 (the first steps compile, the last
saves): s/step, the trainer's idle fraction (timing/trainer_idle / step: waiting for
generation batches) and the engine's (timing/generator_idle / step); then the ratio and the
bound (gen + train) / max(gen, train) from the synchronous run's phases (gen: the trainer's
wait for generation; train: the rest of its step).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run_mode(name: str, steps: int, staleness: int | None, extra: list[str],
             root: Path) -> list[dict]:
    from dapo_jax import launch, placement
    from dapo_jax.train.config import apply_overrides, load_config_file

    run_dir = root / name
    flags = {"generator.backend": "sidecar", "generator.sidecar_engine": "jax",
             "trainer.placement.colocate_all": False,
             "trainer.placement.policy_num_gpus_per_node": 1,
             "trainer.max_steps": steps, "trainer.eval_before_train": False,
             "trainer.eval_interval": 0, "trainer.ckpt_interval": 0,
             "trainer.hf_save_interval": 0, "trainer.resume_mode": "none",
             "trainer.algorithm.use_tis": True, "trainer.run_dir": str(run_dir),
             "trainer.compilation_cache_dir": ""}
    if staleness is not None:
        flags |= {"trainer.fully_async.enabled": True,
                  "trainer.fully_async.max_staleness_steps": staleness}
    overrides = {**flags, **dict(kv.split("=", 1) for kv in extra)}
    cfg = apply_overrides(load_config_file(str(ROOT / "configs" / "arith_tiny.py")), overrides)
    spec = placement.SidecarSpec(0, (1,), launch.free_port(), root / f"{name}_sidecar.log")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    cmd = placement.sidecar_command(cfg, spec, (run_dir / "exports").resolve())
    (run_dir / "exports").mkdir(parents=True, exist_ok=True)
    with open(spec.log, "wb") as log:
        sidecar = subprocess.Popen(["taskset", "-c", "1", *cmd], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(spec.url + "/health", timeout=5):
                    break
            except OSError:
                if sidecar.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"sidecar did not start; see {spec.log}") from None
                time.sleep(0.5)
        trainer = ["taskset", "-c", "0", sys.executable, "-m", "dapo_jax.train", "--config",
                   "configs/arith_tiny.py", *[f"--config.{k}={v}" for k, v in overrides.items()],
                   f"--config.generator.sidecar_urls={(spec.url,)!r}"]
        proc = subprocess.Popen(trainer, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        pinner = threading.Thread(target=pin_children, args=(proc, 1), daemon=True)
        pinner.start()
        _, err = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"{name}: trainer failed:\n{err[-3000:]}")
    finally:
        sidecar.kill()
        sidecar.wait()
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


def pin_children(proc: subprocess.Popen, cpu: int) -> None:
    """Moves the trainer's child processes (the reward pool's workers: scoring is the
    rollout side's work, as on a cluster's host CPUs) to the engine's core while `proc`
    runs; they inherit the trainer's `taskset -c 0` otherwise."""
    pinned: set[int] = set()
    while proc.poll() is None:
        for children in Path(f"/proc/{proc.pid}/task").glob("*/children"):
            try:
                pids = {int(x) for x in children.read_text().split()}
            except OSError:
                continue
            for pid in pids - pinned:
                try:
                    os.sched_setaffinity(pid, {cpu})
                    pinned.add(pid)
                except OSError:
                    pass
        time.sleep(0.5)


def summary(rows: list[dict]) -> dict[str, float]:
    body = rows[2:-1]
    med = lambda k: statistics.median(r[k] for r in body)
    step = med("timing/step")
    return {"step": step, "trainer_idle": med("timing/trainer_idle"),
            "generator_idle": med("timing/generator_idle"),
            "update": med("timing/logprobs") + med("timing/update"), "sync": med("timing/sync"),
            "batches": statistics.mean(r["dynamic_sampling/batches_drawn"] for r in body),
            "staleness_max": max(r["async/staleness_max"] for r in rows),
            "regenerated": sum(r["async/stale_groups_regenerated"] for r in rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--staleness", type=int, default=1)
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value")
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dapo_async_"))
    try:
        sync = summary(run_mode("sync", a.steps, None, a.set, root))
        asyn = summary(run_mode("async", a.steps, a.staleness, a.set, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    gen = sync["trainer_idle"]  # the synchronous trainer waits for the whole generation
    train = sync["step"] - gen
    bound = (gen + train) / max(gen, train)
    print("| mode | s/step | trainer idle | engine idle | log-probs + updates s | export s | "
          "batches/step | staleness max | stale groups regenerated |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, s in (("sync", sync), (f"async (staleness {a.staleness})", asyn)):
        print(f"| {name} | {s['step']:.3f} | {s['trainer_idle'] / s['step']:.0%} | "
              f"{s['generator_idle'] / s['step']:.0%} | {s['update']:.3f} | {s['sync']:.3f} | "
              f"{s['batches']:.2f} | {s['staleness_max']:.0f} | {s['regenerated']:.0f} |")
    ratio = sync["step"] / asyn["step"]
    print(f"gen {gen:.3f} s, train {train:.3f} s (sync phases): bound "
          f"(gen + train) / max(gen, train) = {bound:.2f}x")
    print(f"async / sync speed: {ratio:.2f}x ({ratio / bound:.0%} of the bound)")


if __name__ == "__main__":
    main()
