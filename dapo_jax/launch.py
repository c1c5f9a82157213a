"""One command for a run with rollout sidecars and/or several trainer processes:

    python -m dapo_jax.launch --config configs/<name>.py [--num_processes=N]
        [--config.a.b=value ...]

1. validates the config (without starting JAX: the launcher must not take GPU memory);
2. starts `generator.num_inference_engines` sidecars (`python -m rollout.server`), each in
   its own process group with its GPUs (CUDA_VISIBLE_DEVICES), memory share, a free loopback
   port, the run's export root and a fresh bearer token, logging to <run_dir>/logs/;
3. waits until every sidecar answers /health (a sidecar that exits or misses
   `generator.sidecar_startup_timeout_s` is an error quoting the tail of its log);
4. runs `python -m dapo_jax.train` with the same flags plus the sidecars' URLs, with its own
   GPUs and `XLA_PYTHON_CLIENT_MEM_FRACTION` (see `dapo_jax.placement`); with
   `--num_processes=N`, N trainer processes joined as one JAX job (a coordinator on a free
   loopback port, `mesh.process_id` 0..N-1, each with its share of the trainer's GPUs;
   process 0 prints to the terminal, the others log to <run_dir>/logs/process_<i>.out), and a
   trainer process that fails stops the others (`dapo_jax.multihost`);
5. while it trains, restarts a sidecar that dies (up to `generator.sidecar_max_restarts`
   times; the trainer's client sees the restarted sidecar serve version 0 and pushes the
   current export before generating again, so nothing is generated from stale weights),
   else stops the run with an error;
6. on exit, Ctrl-C, SIGTERM or a crash, ends every child's whole process group; children
   also end their groups when the launcher itself is killed (`dapo_jax.procs`).

The launcher's exit code is the trainer's (the first failing process's with several; 130
after Ctrl-C, 1 after a launch error).
<run_dir>/logs/launch.json lists the children (pid = process group, GPUs, port, log);
"closed" turns true once all of them have been ended.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from absl import app, flags
from ml_collections import ConfigDict, config_flags

from dapo_jax import placement
from dapo_jax.procs import kill_group, log_tail
from dapo_jax.train import config as config_lib
from dapo_jax.train.settings import Settings, validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file",
                                          lock_config=True)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 1, "trainer processes on this machine, joined as one multi-process JAX "
    "job (each with its share of the trainer's GPUs)", lower_bound=1)
REPO = Path(__file__).resolve().parent.parent


class LaunchError(RuntimeError):
    pass


class _Stop(Exception):
    """SIGTERM, turned into an exception so that the clean-up runs."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launch:
    """The sidecars and the trainer of one run, and their clean-up."""

    def __init__(self, s: Settings, flags: list[str], num_processes: int = 1):
        self.settings = s
        self.flags = flags
        self.num_processes = num_processes
        self.run_dir = s.checkpoint.run_dir.resolve()
        self.logs = self.run_dir / "logs"
        self.export_root = Path(s.rollout.export_dir or self.run_dir / "exports").resolve()
        self.token = secrets.token_hex(16)
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
        self.specs = [placement.SidecarSpec(i, gpus, free_port(), self.logs / f"sidecar_{i}.log")
                      for i, gpus in enumerate(placement.engine_gpus(s))] \
            if s.rollout.backend == "sidecar" else []
        self.sidecars: dict[int, subprocess.Popen] = {}
        self.restarts = {s.index: 0 for s in self.specs}
        self.trainers: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ sidecars
    def start_sidecar(self, spec: placement.SidecarSpec) -> None:
        cmd = placement.sidecar_command(self.settings, spec, self.export_root)
        env = placement.sidecar_env(self.settings, spec, self.env, self.token)
        with open(spec.log, "ab") as log:
            log.write(f"\n==> {' '.join(cmd)}\n".encode())
            self.sidecars[spec.index] = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        self._write_manifest()

    def _healthy(self, spec: placement.SidecarSpec) -> bool:
        req = urllib.request.Request(spec.url + "/health",
                                     headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_healthy(self, specs: list[placement.SidecarSpec]) -> None:
        timeout = self.settings.rollout.sidecar_startup_timeout_s
        deadline = time.monotonic() + timeout
        waiting = list(specs)
        while waiting:
            for spec in list(waiting):
                code = self.sidecars[spec.index].poll()
                if code is not None:
                    raise LaunchError(f"sidecar {spec.index} (GPUs {list(spec.gpus)}, port "
                                      f"{spec.port}) exited with code {code} before becoming "
                                      f"healthy; last lines of {spec.log}:\n"
                                      f"{log_tail(spec.log)}")
                if self._healthy(spec):
                    waiting.remove(spec)
            if waiting and time.monotonic() > deadline:
                spec = waiting[0]
                raise LaunchError(f"sidecar {spec.index} (GPUs {list(spec.gpus)}, port "
                                  f"{spec.port}) did not answer /health within {timeout:g} s "
                                  "(generator.sidecar_startup_timeout_s); last lines of "
                                  f"{spec.log}:\n{log_tail(spec.log)}")
            time.sleep(0.5)

    def _check_sidecars(self) -> None:
        """Restarts a sidecar that died, or raises when it has no restarts left."""
        for spec in self.specs:
            code = self.sidecars[spec.index].poll()
            if code is None:
                continue
            kill_group(self.sidecars[spec.index], grace_s=2.0)  # what is left of its workers
            if self.restarts[spec.index] >= self.settings.rollout.sidecar_max_restarts:
                raise LaunchError(
                    f"sidecar {spec.index} (port {spec.port}) died with code {code} after "
                    f"{self.restarts[spec.index]} restart(s) (generator.sidecar_max_restarts="
                    f"{self.settings.rollout.sidecar_max_restarts}); stopping the run. Last lines "
                    f"of {spec.log}:\n{log_tail(spec.log)}")
            self.restarts[spec.index] += 1
            print(f"launch: sidecar {spec.index} died with code {code}; restart "
                  f"{self.restarts[spec.index]} of {self.settings.rollout.sidecar_max_restarts}",
                  file=sys.stderr, flush=True)
            self.start_sidecar(spec)
            self.wait_healthy([spec])

    # ------------------------------------------------------------------ trainer
    def start_trainers(self) -> None:
        cmd = [sys.executable, "-m", "dapo_jax.train", *self.flags]
        if self.specs:
            cmd.append(f"--config.generator.sidecar_urls={tuple(s.url for s in self.specs)!r}")
        n = self.num_processes
        if n > 1:
            cmd += [f"--config.mesh.coordinator_address=127.0.0.1:{free_port()}",
                    f"--config.mesh.num_processes={n}"]
        for i in range(n):
            env = {**placement.trainer_env(self.settings, self.env, i, n),
                   placement.TOKEN_ENV: self.token}
            out = None if i == 0 else open(self.logs / f"process_{i}.out", "ab")
            self.trainers.append(subprocess.Popen(
                cmd + ([f"--config.mesh.process_id={i}"] if n > 1 else []), env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True))
            if out is not None:
                out.close()
        self._write_manifest()

    def _trainers_done(self) -> int | None:
        """None while the trainers run; their exit code once all succeeded or one failed
        (then the others are stopped: they would only wait for it until a timeout)."""
        codes = [p.poll() for p in self.trainers]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            i, code = failed[0]
            if len(self.trainers) > 1:
                where = "" if i == 0 else f"; last lines of {self.logs / f'process_{i}.out'}:\n" \
                    f"{log_tail(self.logs / f'process_{i}.out')}"
                print(f"launch: trainer process {i} exited with code {code}; stopping the "
                      f"other trainer processes{where}", file=sys.stderr, flush=True)
            return code
        return 0 if all(c == 0 for c in codes) else None

    def run(self) -> int:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.export_root.mkdir(parents=True, exist_ok=True)
        for spec in self.specs:
            self.start_sidecar(spec)
        self.wait_healthy(self.specs)
        self.start_trainers()
        while (code := self._trainers_done()) is None:
            self._check_sidecars()
            time.sleep(1.0)
        return code

    def close(self) -> None:
        children = self.trainers + list(self.sidecars.values())
        for proc in children:
            kill_group(proc)
        self._write_manifest(closed=True)

    def _write_manifest(self, closed: bool = False) -> None:
        manifest = {"launcher_pid": os.getpid(), "closed": closed,
                    "trainer_pids": [p.pid for p in self.trainers],
                    "sidecars": [{"index": s.index, "pid": self.sidecars[s.index].pid,
                                  "gpus": list(s.gpus), "url": s.url, "log": str(s.log)}
                                 for s in self.specs if s.index in self.sidecars]}
        tmp = self.logs / "launch.json.tmp"
        tmp.write_text(json.dumps(manifest, indent=2))
        tmp.replace(self.logs / "launch.json")


def trainer_flags(argv: list[str]) -> list[str]:
    """The launcher's command line minus its own flags: what the trainer gets."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--num_processes", "-num_processes"):
            skip = True  # its value follows
        elif not arg.lstrip("-").startswith("num_processes="):
            out.append(arg)
    return out


def check(cfg: ConfigDict, num_processes: int) -> Settings:
    """The trainer's own validation (without JAX: the launcher must not take GPU memory),
    then what the launcher itself refuses. Raises ConfigError naming the key."""
    ConfigError = config_lib.ConfigError
    s = validate(cfg, num_devices=None)
    if s.rollout.backend != "sidecar" and num_processes == 1:
        raise ConfigError("generator.backend: dapo_jax.launch starts rollout sidecars or "
                          f"several trainer processes, and the config has generator.backend="
                          f"{s.rollout.backend!r} and --num_processes=1: run `python -m "
                          "dapo_jax.train` for one in-process trainer")
    if num_processes > 1 and s.rollout.backend == "jax" and not s.placement.colocate_all:
        # Each process's devices would be its share of the trainer's GPUs and of the
        # generation meshes'; the trainer reads policy_num_gpus_per_node per process.
        raise ConfigError("trainer.placement.colocate_all: --num_processes with generation "
                          "meshes in the trainer processes (generator.backend=jax, "
                          "colocate_all=false): start one `python -m dapo_jax.train` per host "
                          "with mesh.coordinator_address / num_processes / process_id "
                          "(policy_num_gpus_per_node then counts each process's trainer "
                          "devices)")
    if num_processes > 1 and s.mesh.distributed.coordinator_address:
        raise ConfigError("mesh.coordinator_address: --num_processes starts its own "
                          "coordinator: leave it unset")
    if s.rollout.sidecar_urls:
        raise ConfigError("generator.sidecar_urls is set: the launcher starts its own "
                          "sidecars; use `python -m dapo_jax.train` with sidecars you run")
    return s


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    try:
        settings = check(_CONFIG.value, _NUM_PROCESSES.value)
    except config_lib.ConfigError as e:
        # The user's to fix: one line naming the key, as `python -m dapo_jax.train` says it.
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    launch = Launch(settings, trainer_flags(sys.argv[1:]), _NUM_PROCESSES.value)

    def on_sigterm(signum, frame):
        raise _Stop

    signal.signal(signal.SIGTERM, on_sigterm)
    # Started from a script's background job, a process inherits SIGINT ignored (and Python
    # then leaves it so): a `kill -INT` or the terminal's Ctrl-C must still stop the run.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    code = 1
    try:
        code = launch.run()
    except LaunchError as e:
        print(f"launch: {e}", file=sys.stderr, flush=True)
    except (KeyboardInterrupt, _Stop):
        print("launch: interrupted; stopping the trainer and the sidecars", file=sys.stderr,
              flush=True)
        code = 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        launch.close()
    sys.exit(code)


if __name__ == "__main__":
    from dapo_jax.train.config import parse_flags

    app.run(main, flags_parser=parse_flags)
